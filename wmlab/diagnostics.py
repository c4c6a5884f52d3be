"""Why does an encoder plan well? Diagnostics of a trained run's latent space that measure what
their names say.

1. **Linear probe** latent -> agent (x, y): ridge regression with the *same feature budget* for every
   encoder (PCA to ``PROBE_DIMS`` dims, fitted on the probe's training frames; k is recorded), R^2 on
   frames of held-out *episodes* (neighbouring frames of one episode are near-duplicates, so a
   frame-level split would flatter every encoder). The study passes the episodes no in-domain encoder
   (a VAE trained on the dataset) saw; without that list the split is random and the row says so.
2. **Latent vs true distance**: Spearman rank correlation between the latent distance of a frame to
   a goal frame (MSE over visual tokens in the run's latent units, standardised per channel when the run
   standardises: the planner objective's visual term) and the maze's
   shortest-path distance between the two agent positions (``wmlab.envs.geodesic``), *per goal*,
   averaged over goals: a planner only ranks candidates against one goal at a time, and a pooled
   correlation mixes in how each goal's latent distances happen to be scaled. A local version keeps
   only pairs within a geodesic radius (the endgame of planning). The pooled value is kept for reference.
3. **Open-loop prediction error** at 1..K model steps: num_hist teacher frames, then an
   autoregressive rollout with the dataset's actions on windows of the run's validation episodes, in
   the run's latent units (as 2; the probe, 1, reads the encoder's own tokens).
   Reported as *skill against copy-last* (model MSE / MSE of repeating the last given frame, per
   horizon: above 1 the model is worse than not predicting at all, and the report flags it) and a
   *temporally normalised NMSE* (total squared error over channels / total mean squared one-step
   change over channels). The older NMSE normalised by each channel's variance pooled over frames and
   tokens is kept as ``nmse_by_horizon``: that variance is mostly spatial, so copy-last already scores
   far below 1, and a near-constant channel divides by ~0.
4. **Cost**: feature size per frame (tokens x dim, bytes in the feature cache's float16) and the
   encoder's throughput in images/s on a small batch. Costs are listed beside success, never
   correlated with it as predictors.

``diagnose_run(run_dir)`` computes all four for one run; the helpers below are the pieces, each
testable on synthetic arrays.

Probe features. Tokens (N, D) are flattened when N * D <= ``FEATURE_CAP`` (2048). Larger latents
keep their token layout (which patch holds the agent is the position signal) and compress each
token's D channels by one seeded Gaussian random projection to floor(2048 / N) channels (a
Johnson-Lindenstrauss map: linear information survives, the PCA stays cheap); grids of more than
2048 tokens are first mean-pooled over runs of consecutive tokens. Then PCA to ``PROBE_DIMS``. The
ridge penalty is chosen by group k-fold cross-validation on the training episodes unless given.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch

#: Largest probe feature vector per frame (see the module docstring for how latents are reduced).
FEATURE_CAP = 2048
#: Ridge penalties tried, in units of the number of training frames (for standardised features
#: that is the mean eigenvalue of X^T X, so the grid means the same thing for any feature size).
RIDGE_GRID = tuple(float(a) for a in np.logspace(-6, 3, 10))
#: Goal frames the latent-distance pairs are measured against (pairs share them, as a planner
#: compares many candidate states against one goal).
N_GOALS = 16
#: Fewest (frame, goal) pairs per goal: fewer goals are drawn when n_pairs is small.
MIN_PAIRS_PER_GOAL = 8
#: The probe's feature budget: every encoder's features are reduced to this many principal components
#: (fitted on the probe's training frames) so a bigger latent does not buy a better probe.
PROBE_DIMS = 64
#: Relative floor on a channel's variance in NMSE: a channel that never varies must not divide by 0.
VARIANCE_FLOOR = 1e-6


# ---------------------------------------------------------------------------------------- probe
def probe_features(tokens, *, cap: int = FEATURE_CAP, seed: int = 0) -> np.ndarray:
    """Latent tokens (M, N, D) -> probe features float32 (M, F) with F <= ``cap``.

    Flattened when N * D <= cap; else tokens are kept, each projected D -> floor(cap / N) channels
    by a Gaussian matrix seeded by ``seed`` (the same for every call with the same shapes, so
    chunks of one dataset share it), after mean-pooling runs of consecutive tokens if N > cap.
    """
    z = torch.as_tensor(tokens).float()
    if z.ndim != 3:
        raise ValueError(f"tokens must be (M, N, D), got shape {tuple(z.shape)}")
    M, N, D = z.shape
    if N * D <= cap:
        return z.reshape(M, N * D).numpy()  # (M, N*D)
    if N > cap:
        group = -(-N // cap)  # ceil: tokens per pooled run
        pad = (-N) % group
        if pad:  # repeat the last token so every run has `group` members
            z = torch.cat([z, z[:, -1:].expand(M, pad, D)], dim=1)  # (M, N+pad, D)
        z = z.reshape(M, -1, group, D).mean(dim=2)  # (M, ceil(N/group), D)
        N = z.shape[1]
    if N * D <= cap:
        return z.reshape(M, N * D).numpy()
    k = max(1, cap // N)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(D, k, generator=generator) / np.sqrt(k)  # (D, k)
    return (z @ projection).reshape(M, N * k).numpy()  # (M, N*k)


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std < 1e-12] = 1.0  # a constant feature stays 0 rather than dividing by zero
    return [(x - mean) / std for x in (train, *others)]


def _r2(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over output columns of 1 - SS_res / SS_tot (around the evaluated frames' own mean)."""
    ss_res = ((pred - true) ** 2).sum(axis=0)
    ss_tot = ((true - true.mean(axis=0)) ** 2).sum(axis=0)
    return float(np.mean(1.0 - ss_res / np.maximum(ss_tot, 1e-12)))


def _ridge_path(X: np.ndarray, y: np.ndarray, X_eval: np.ndarray, lambdas) -> list[np.ndarray]:
    """Predictions on X_eval (E, F) of ridge fits of y (n, T) on X (n, F), one per lambda.

    One symmetric eigendecomposition serves every lambda: of X^T X (F, F) when F <= n, else of the
    Gram matrix X X^T (n, n) (the dual form). torch's eigh, not numpy's SVD: on small CPUs the
    latter's BLAS threads oversubscribe and run 10-100x slower.
    """
    X, y, X_eval = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for v in (X, y, X_eval))
    if X.shape[1] <= X.shape[0]:
        e, V = torch.linalg.eigh(X.T @ X)  # (F,), (F, F)
        A = X_eval @ V  # (E, F)
        B = V.T @ (X.T @ y)  # (F, T)
    else:
        e, U = torch.linalg.eigh(X @ X.T)  # (n,), (n, n)
        A = (X_eval @ X.T) @ U  # (E, n)
        B = U.T @ y  # (n, T)
    e = e.clamp_min(0.0)
    return [(A @ (B / (e + lam)[:, None])).numpy() for lam in lambdas]


def pca_fit(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k principal directions of X (n, F): (mean (F,), components (F, k')) with k' = min(k, n-1, F).

    Centred, not standardised: the components follow the latent's own geometry (the one the planner's
    MSE objective sees), so a near-constant channel does not get promoted to unit variance.
    """
    X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
    n, F = X.shape
    k = max(1, min(int(k), n - 1, F))
    mean = X.mean(dim=0)
    Xc = X - mean  # (n, F)
    if F <= n:
        e, V = torch.linalg.eigh(Xc.T @ Xc)  # ascending (F,), (F, F)
        comps = V[:, -k:].flip(1)  # (F, k) largest first
    else:  # dual form: eigenvectors of the Gram matrix map back through Xc^T
        e, U = torch.linalg.eigh(Xc @ Xc.T)  # (n,), (n, n)
        e, U = e[-k:].flip(0), U[:, -k:].flip(1)
        comps = (Xc.T @ U) / e.clamp_min(1e-30).sqrt()  # (F, k) unit columns
    return mean.numpy(), comps.numpy()


def linear_probe_r2(
    features,
    xy,
    groups,
    *,
    ridge: float | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    test_groups=None,
    pca_dims: int | None = None,
    return_info: bool = False,
):
    """R^2 of a ridge regression from features to positions, on held-out groups (episodes).

    Args:
        features: (N, F) one feature vector per frame.
        xy: (N, 2) agent positions (any number of target columns works).
        groups: (N,) episode id per frame; whole groups go to the test split.
        ridge: penalty in units of the number of training frames; None = pick from ``RIDGE_GRID``
            by group k-fold cross-validation (k <= 5) on the training groups.
        test_fraction: share of groups held out (at least one group, at least one kept); ignored
            when ``test_groups`` is given.
        seed: the group split's seed.
        test_groups: the episode ids to evaluate on (e.g. episodes no in-domain encoder trained
            on); every other group trains. None = a seeded random split of the groups.
        pca_dims: the feature budget: project features onto their top-k principal components,
            fitted on the training frames only, before the ridge (the same k for every encoder makes
            probes of latents of any size comparable). None = no projection.
        return_info: also return a dict (pca_dims actually used, frame and group counts).
    Returns:
        R^2 on the test frames, averaged over the target columns: 1 = perfect, 0 = no better than
        the test mean, negative = worse. With ``return_info``: (r2, info).
    """
    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(xy, dtype=np.float64)
    g = np.asarray(groups).reshape(-1)
    if X.ndim != 2 or y.ndim != 2 or not (len(X) == len(y) == len(g)):
        raise ValueError(
            f"features (N, F), xy (N, 2) and groups (N,) must agree, got {X.shape}, {y.shape}, {g.shape}"
        )
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("features or xy contain NaN or inf")
    unique = np.unique(g)
    if len(unique) < 2:
        raise ValueError(f"a grouped split needs at least 2 groups (episodes), got {len(unique)}")
    if test_groups is not None:
        is_test = np.isin(g, np.asarray(test_groups).reshape(-1))
        if is_test.all() or not is_test.any():
            raise ValueError(
                f"test_groups must leave frames on both sides: {int(is_test.sum())} of {len(g)} frames "
                "are in the given held-out episodes"
            )
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        order = np.random.default_rng(seed).permutation(unique)
        n_test = min(max(1, round(test_fraction * len(unique))), len(unique) - 1)
        is_test = np.isin(g, order[:n_test])
    X_train, X_test, g_train = X[~is_test], X[is_test], g[~is_test]
    y_train = y[~is_test]
    used_dims = None
    if pca_dims is not None:
        if pca_dims < 1:
            raise ValueError(f"pca_dims must be >= 1, got {pca_dims}")
        mean, comps = pca_fit(X_train, pca_dims)  # fitted on training frames only
        X_train, X_test = (X_train - mean) @ comps, (X_test - mean) @ comps  # (n, k)
        used_dims = int(comps.shape[1])
    X_train, X_test = _standardise(X_train, X_test)
    y_mean = y_train.mean(axis=0)
    if ridge is None:
        ridge = _cross_validated_ridge(X_train, y_train - y_mean, g_train, seed)
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    (pred,) = _ridge_path(X_train, y_train - y_mean, X_test, [ridge * len(X_train)])
    r2 = _r2(pred + y_mean, y[is_test])
    if not return_info:
        return r2
    info = {
        "pca_dims": used_dims,
        "n_train_frames": int((~is_test).sum()),
        "n_test_frames": int(is_test.sum()),
        "n_test_episodes": len(np.unique(g[is_test])),
        "ridge": float(ridge),
    }
    return r2, info


def _cross_validated_ridge(X: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> float:
    """The ``RIDGE_GRID`` penalty with the best mean R^2 over group folds of the training frames."""
    unique = np.random.default_rng(seed + 1).permutation(np.unique(groups))
    k = min(5, len(unique))
    if k < 2:
        return 1.0  # one training episode: nothing to validate on; a moderate penalty
    scores = np.zeros(len(RIDGE_GRID))
    for fold in range(k):
        held = np.isin(groups, unique[fold::k])
        lambdas = [a * int((~held).sum()) for a in RIDGE_GRID]
        y_mean = y[~held].mean(axis=0)
        preds = _ridge_path(X[~held], y[~held] - y_mean, X[held], lambdas)
        scores += [_r2(p + y_mean, y[held]) for p in preds]
    return RIDGE_GRID[int(np.argmax(scores))]


# ---------------------------------------------------------------------------------------- ranks
def rankdata(x) -> np.ndarray:
    """Ranks 1..N of x (N,), ties get the mean of the ranks they span (float64 (N,))."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    sorted_x = x[order]
    # Runs of equal values: average their ranks.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for a, b in zip(starts, ends, strict=True):
        if b - a > 1:
            ranks[order[a:b]] = (a + 1 + b) / 2.0
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation of x (N,) and y (N,) (Pearson on tie-averaged ranks).

    NaN when either side is constant (no order to compare) or N < 2.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x or y contain NaN or inf")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def latent_distance(z_a, z_b) -> np.ndarray:
    """MSE over tokens and channels between latents z_a, z_b (M, N, D) -> float64 (M,)."""
    z_a, z_b = torch.as_tensor(z_a).float(), torch.as_tensor(z_b).float()
    if z_a.shape != z_b.shape or z_a.ndim != 3:
        raise ValueError(f"latents must both be (M, N, D), got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    return ((z_a - z_b) ** 2).mean(dim=(1, 2)).double().numpy()


def per_goal_spearman(latent, geodesic, goal, *, radius: float | None = None, min_points: int = 3):
    """Mean over goals of the Spearman ρ between latent and geodesic distance to that goal.

    A planner compares candidate states against *one* goal at a time, so only the order of
    distances to the same goal matters; pooling pairs of different goals mixes in how each goal's
    latent distances are scaled, which says nothing about planning (a per-goal rescaling changes
    the pooled ρ and leaves this one unchanged).

    Args:
        latent, geodesic: (P,) distances of each (state, goal) pair; non-finite pairs are left out
            (an unreachable cell has no geodesic rank).
        goal: (P,) goal id of each pair.
        radius: local version: only pairs with geodesic distance <= radius (the planner's endgame).
        min_points: goals with fewer usable pairs (or constant distances) are skipped.
    Returns:
        (mean ρ over the goals used, number of goals used); (nan, 0) when none qualifies.
    """
    latent = np.asarray(latent, dtype=np.float64).reshape(-1)
    geodesic = np.asarray(geodesic, dtype=np.float64).reshape(-1)
    goal = np.asarray(goal).reshape(-1)
    if not (len(latent) == len(geodesic) == len(goal)):
        raise ValueError(
            f"latent, geodesic and goal must have one entry per pair, got {len(latent)}, "
            f"{len(geodesic)}, {len(goal)}"
        )
    keep = np.isfinite(latent) & np.isfinite(geodesic)
    if radius is not None:
        keep &= geodesic <= radius
    rhos = []
    for g in np.unique(goal[keep]):
        mine = keep & (goal == g)
        if mine.sum() < min_points:
            continue
        rho = spearman(latent[mine], geodesic[mine])
        if np.isfinite(rho):
            rhos.append(rho)
    return (float(np.mean(rhos)), len(rhos)) if rhos else (float("nan"), 0)


# ---------------------------------------------------------------------------------------- NMSE
def channel_variance(tokens) -> torch.Tensor:
    """Variance of each channel over all leading axes: tokens (..., D) -> float64 (D,)."""
    z = torch.as_tensor(tokens).double()
    return z.reshape(-1, z.shape[-1]).var(dim=0, unbiased=False)


def normalized_mse(pred, true, variance) -> np.ndarray:
    """Per-horizon NMSE: pred, true (B, K, N, D), variance (D,) -> float64 (K,).

    NMSE_k = mean over channels d of [mean over b, n of (pred - true)^2] / Var_d, with Var_d floored
    at ``VARIANCE_FLOOR`` x the mean variance. 1 = as far off as predicting the channel's mean.
    """
    pred, true = torch.as_tensor(pred).double(), torch.as_tensor(true).double()
    variance = torch.as_tensor(variance).double().reshape(-1)
    if pred.shape != true.shape or pred.ndim != 4:
        raise ValueError(
            f"pred and true must both be (B, K, N, D), got {tuple(pred.shape)}, {tuple(true.shape)}"
        )
    if variance.shape[0] != pred.shape[-1]:
        raise ValueError(f"variance must be (D,) = ({pred.shape[-1]},), got {tuple(variance.shape)}")
    floor = VARIANCE_FLOOR * float(variance.mean().clamp_min(1e-30))
    mse = ((pred - true) ** 2).mean(dim=(0, 2))  # (K, D)
    return (mse / variance.clamp_min(floor)).mean(dim=1).numpy()  # (K,)


def mean_step_change(visual) -> torch.Tensor:
    """Mean squared one-step change of each channel: visual (B, L, N, D) -> float64 (D,).

    E[(z_{t+1} - z_t)^2] over windows, consecutive model steps and tokens: the temporal scale a
    predictor has to resolve (copying the last frame scores exactly this at one step).
    """
    z = torch.as_tensor(visual).double()
    if z.ndim != 4 or z.shape[1] < 2:
        raise ValueError(f"visual must be (B, L >= 2, N, D), got {tuple(z.shape)}")
    step = z[:, 1:] - z[:, :-1]  # (B, L-1, N, D)
    return (step**2).reshape(-1, z.shape[-1]).mean(dim=0)


def prediction_errors(pred, true, last, step_change) -> dict[str, np.ndarray]:
    """Open-loop error of a model against copy-last, per horizon.

    Args:
        pred, true: (B, K, N, D) predicted and true latents at model steps 1..K.
        last: (B, N, D) the last given (context) frame: the copy-last prediction at every horizon.
        step_change: (D,) ``mean_step_change`` of the data (the temporal normaliser).
    Returns:
        float64 (K,) arrays: ``mse`` (model), ``copy_last_mse``, ``skill`` = mse / copy_last_mse
        (1 = no better than copying the last frame, < 1 better, > 1 worse), ``nmse_temporal`` = total
        squared error over channels / total mean squared one-step change over channels (1 = off by
        a typical one-step change). Summing before dividing is deliberate: a channel that hardly
        moves contributes in proportion to its motion instead of dividing by ~0.
    """
    pred, true = torch.as_tensor(pred).double(), torch.as_tensor(true).double()
    last = torch.as_tensor(last).double()
    step_change = torch.as_tensor(step_change).double().reshape(-1)
    if pred.shape != true.shape or pred.ndim != 4:
        raise ValueError(
            f"pred and true must both be (B, K, N, D), got {tuple(pred.shape)}, {tuple(true.shape)}"
        )
    B, _K, N, D = pred.shape
    if tuple(last.shape) != (B, N, D) or step_change.shape[0] != D:
        raise ValueError(
            f"last must be (B, N, D) = {(B, N, D)} and step_change (D,) = ({D},), got "
            f"{tuple(last.shape)} and {tuple(step_change.shape)}"
        )
    mse_d = ((pred - true) ** 2).mean(dim=(0, 2))  # (K, D)
    copy_d = ((last[:, None] - true) ** 2).mean(dim=(0, 2))  # (K, D)
    mse, copy = mse_d.mean(dim=1), copy_d.mean(dim=1)  # (K,)
    scale = step_change.sum().clamp_min(1e-30)
    return {
        "mse": mse.numpy(),
        "copy_last_mse": copy.numpy(),
        "skill": (mse / copy.clamp_min(1e-30)).numpy(),
        "nmse_temporal": (mse_d.sum(dim=1) / scale).numpy(),
    }


def _model_device(model):
    if hasattr(model, "parameters"):
        return next(iter(model.parameters()), torch.empty(0)).device
    return "cpu"


def model_units(model, tokens: torch.Tensor) -> torch.Tensor:
    """Encoder tokens -> the model's latent units on the CPU (its ``standardize_visual``; unchanged for a
    model without one): rollout predictions are in these units, so truths are compared there."""
    standardize = getattr(model, "standardize_visual", None)
    if standardize is None:
        return tokens
    return standardize(torch.as_tensor(tokens).to(_model_device(model)).float()).cpu()


@torch.no_grad()
def open_loop_predictions(model, visual, proprio, actions, horizons: int, chunk: int = 16) -> torch.Tensor:
    """Autoregressive predictions at model steps 1..horizons: (B, horizons, N, D) float32 on CPU, in the
    model's latent units (compare with ``model_units(model, tokens)``).

    Args as ``open_loop_nmse``: the first ``model.cfg.num_hist`` frames of each window are given.
    """
    visual, proprio, actions = (torch.as_tensor(v).float() for v in (visual, proprio, actions))
    H = int(model.cfg.num_hist)
    B, L = visual.shape[:2]
    if L < H + horizons or proprio.shape[:2] != (B, L) or actions.shape[:2] != (B, L):
        raise ValueError(
            f"need (B, num_hist + horizons = {H + horizons}, ...) windows, got visual {tuple(visual.shape)}, "
            f"proprio {tuple(proprio.shape)}, actions {tuple(actions.shape)}"
        )
    device = _model_device(model)
    preds = []
    for s in range(0, B, chunk):
        out = model.rollout(
            visual[s : s + chunk, :H].to(device),
            proprio[s : s + chunk, :H].to(device),
            actions[s : s + chunk, : H + horizons - 1].to(device),
        )
        preds.append(out["visual"][:, H : H + horizons].float().cpu())  # (b, K, N, D)
    return torch.cat(preds)  # (B, K, N, D)


@torch.no_grad()
def open_loop_nmse(
    model, visual, proprio, actions, horizons: int, variance=None, chunk: int = 16
) -> np.ndarray:
    """Open-loop NMSE at 1..horizons model steps, normalised by pooled channel variance (legacy).

    Prefer ``open_loop_errors``: the pooled channel variance is mostly *spatial* (how tokens and
    frames differ), so copying the last frame already scores far below 1 and near-constant channels
    dominate the mean of ratios.

    Args:
        model: has ``cfg.num_hist`` (H) and ``rollout(visual, proprio, actions)`` (the world-model API).
        visual: (B, H + K, N, D) true tokens; proprio: (B, H + K, P); actions: (B, H + K, A),
            normalised as in training, K >= horizons.
        variance: (D,) channel variance to normalise by; default: of ``visual`` itself.
        chunk: windows rolled out at once (bounds memory).
    Returns:
        float64 (horizons,): the first H frames are given, the next ``horizons`` predicted.
    """
    visual = torch.as_tensor(visual).float()
    H = int(model.cfg.num_hist)
    pred = open_loop_predictions(model, visual, proprio, actions, horizons, chunk)
    visual = model_units(model, visual)
    variance = channel_variance(visual) if variance is None else variance
    return normalized_mse(pred, visual[:, H : H + horizons], variance)


@torch.no_grad()
def open_loop_errors(
    model, visual, proprio, actions, horizons: int, chunk: int = 16
) -> dict[str, np.ndarray]:
    """``prediction_errors`` of the model's open-loop rollout at 1..horizons model steps.

    Args as ``open_loop_nmse``. The temporal normaliser is the windows' own mean squared one-step
    change; copy-last repeats frame H - 1 (the last given one).
    """
    visual = torch.as_tensor(visual).float()
    H = int(model.cfg.num_hist)
    pred = open_loop_predictions(model, visual, proprio, actions, horizons, chunk)
    visual = model_units(model, visual)
    return prediction_errors(pred, visual[:, H : H + horizons], visual[:, H - 1], mean_step_change(visual))


# ---------------------------------------------------------------------------------------- cost
@torch.no_grad()
def encoder_throughput(encoder, frames, *, min_seconds: float = 0.5, max_repeats: int = 20) -> float:
    """Images per second of ``encoder.encode`` on frames uint8 (B, H, W, 3), after one warm-up call."""
    frames = torch.as_tensor(frames)
    device = next(iter(encoder.parameters()), torch.empty(0)).device
    frames = frames.to(device)
    encoder.encode(frames)  # warm-up: lazy init, kernel selection
    repeats, started = 0, time.perf_counter()
    while repeats < max_repeats:
        encoder.encode(frames)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        repeats += 1
        if time.perf_counter() - started >= min_seconds:
            break
    return repeats * len(frames) / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------- a run
def maze_of(cfg: dict, store) -> str:
    """The maze layout name of a run: its env config, else the dataset's collection metadata."""
    env = cfg.get("env") or {}
    if isinstance(env, dict) and env.get("maze"):
        return str(env["maze"])
    meta = store.metadata
    if (meta.get("env_kwargs") or {}).get("maze"):
        return str(meta["env_kwargs"]["maze"])
    from wmlab.envs import env_entry

    name = meta.get("env") or (env.get("name") if isinstance(env, dict) else None)
    if name is None:
        raise ValueError(
            f"cannot tell which maze the dataset {store.path} was collected in (no env metadata)"
        )
    maze = env_entry(str(name)).kwargs.get("maze")
    if maze is None:
        raise ValueError(f"env {name!r} of {store.path} is not a maze: latent-vs-geodesic needs one")
    return str(maze)


class _TokenReader:
    """Visual tokens float32 (M, N, D) of frames of one episode: from the feature cache if the run
    trained on one (as training did), else encoded now."""

    def __init__(self, store, cache, encoder, device, batch: int = 64) -> None:
        self.store, self.cache, self.encoder, self.device, self.batch = store, cache, encoder, device, batch

    @torch.no_grad()
    def __call__(self, episode: int, times) -> torch.Tensor:
        times = np.asarray(times, dtype=np.int64)
        if self.cache is not None:
            return torch.from_numpy(self.cache.read(int(episode), times)).float()  # (M, N, D) from fp16
        parts = []
        for s in range(0, len(times), self.batch):
            frames = torch.from_numpy(
                self.store.frames(int(episode), times[s : s + self.batch])
            )  # (b, H, W, 3)
            parts.append(self.encoder.encode(frames.to(self.device)).float().cpu())  # (b, N, D)
        return torch.cat(parts)


def _sample_frames(lengths: np.ndarray, episodes: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """n distinct (episode, time) pairs drawn uniformly over the frames of ``episodes``."""
    counts = lengths[episodes]
    total = int(counts.sum())
    flat = rng.choice(total, size=min(n, total), replace=False)  # random order
    bounds = np.cumsum(counts)
    which = np.searchsorted(bounds, flat, side="right")  # index into episodes
    times = flat - (bounds[which] - counts[which])
    return episodes[which], times


def _read_sample(read, episodes: np.ndarray, times: np.ndarray, on_chunk) -> None:
    """Read the sample's tokens episode by episode (one read per episode, in time order) and call
    ``on_chunk(sample indices (m,), tokens (m, N, D))``."""
    for episode in np.unique(episodes):
        idx = np.flatnonzero(episodes == episode)
        idx = idx[np.argsort(times[idx], kind="stable")]
        for s in range(0, len(idx), 256):
            part = idx[s : s + 256]
            on_chunk(part, read(int(episode), times[part]))


def diagnose_run(
    run_dir,
    *,
    data=None,
    n_frames: int = 2000,
    n_pairs: int = 1000,
    horizons: int = 10,
    n_windows: int = 64,
    throughput_batch: int = 8,
    device: str = "cpu",
    seed: int = 0,
    heldout_episodes=None,
    probe_dims: int = PROBE_DIMS,
    local_radius: float | None = None,
) -> tuple[dict, dict]:
    """Diagnostics 1-4 of the trained run in ``run_dir``.

    Args:
        run_dir: a ``wmlab train`` run directory (config.yaml, model.safetensors, normalization.json).
        data: the dataset (path or ``TrajectoryStore``); default: the path in the run's config.
        n_frames: frames (drawn uniformly over all complete episodes) for the probe and variance.
        n_pairs: (frame, goal frame) pairs for the latent-vs-geodesic correlation (<= n_frames).
        horizons: open-loop steps K for NMSE (fewer, with a warning, if validation episodes are short).
        n_windows: validation windows rolled out for NMSE.
        throughput_batch: frames per encoder call when timing the encoder.
        device: where the encoder and world model run ("cpu", "cuda", "auto").
        seed: frame sampling, probe split and projection.
        heldout_episodes: episode ids no in-domain encoder (or world model) trained on; the probe
            trains on frames of the other episodes and is scored on a quarter of ``n_frames`` drawn
            from these. None: a seeded random split of episodes (``probe_split`` says "random").
        probe_dims: the probe's feature budget: PCA to this many dims, fitted on training frames.
        local_radius: geodesic radius of the local distance correlation; None = the 25th
            percentile of the pairs' geodesic distances (recorded in the row).
    Returns:
        (row, distances). row: encoder, probe_r2, probe_dims, probe_split, probe_test_episodes,
        distance_spearman_per_goal (mean over goals), distance_spearman_local (the same within
        local_radius), local_radius, n_goals, distance_spearman (pooled over goals, kept for
        comparison), mse_by_horizon, copy_last_mse_by_horizon, skill_by_horizon (model / copy-last
        error, K floats), nmse_temporal_by_horizon, worse_than_copy_last (horizons 1..K where
        skill > 1), nmse_by_horizon (legacy pooled-variance NMSE), num_tokens, dim,
        bytes_per_frame, encoder_images_per_s. distances: {"latent", "geodesic", "goal"}: one
        entry per pair (goal = goal id) for a scatter plot and per-goal statistics.
    """
    from wmlab.data.normalization import NormalizationStats
    from wmlab.data.store import TrajectoryStore
    from wmlab.data.windows import WindowDataset, WindowSpec, split_episodes
    from wmlab.envs.geodesic import geodesic_distance
    from wmlab.runs import build_encoder, find_feature_cache, load_run, resolve_device

    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.safetensors", "metadata.json", "normalization.json"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(
                f"{run_dir / name} not found: is {run_dir} a finished wmlab training run?"
            )
    if min(n_frames, n_pairs, horizons, n_windows, throughput_batch) < 1:
        raise ValueError("n_frames, n_pairs, horizons, n_windows and throughput_batch must be >= 1")
    device = resolve_device(device)
    model, cfg = load_run(run_dir, device=device)
    if data is None:
        data = cfg.get("data")
        if data is None:
            raise ValueError(f"{run_dir / 'config.yaml'} names no dataset (data=); pass data=")
    store = data if isinstance(data, TrajectoryStore) else TrajectoryStore(data)
    encoder = build_encoder(dict(cfg["encoder"]), device)
    info = encoder.info
    if (info.num_tokens, info.dim) != (model.cfg.num_visual_tokens, model.cfg.visual_dim):
        raise ValueError(
            f"encoder {info.name} makes ({info.num_tokens}, {info.dim}) tokens but the run's model expects "
            f"({model.cfg.num_visual_tokens}, {model.cfg.visual_dim}); is {run_dir} trained on this encoder?"
        )
    cache = find_feature_cache(store, encoder)
    read = _TokenReader(store, cache, encoder, device)
    rng = np.random.default_rng(seed)
    lengths = store.lengths
    committed = store.committed
    if len(committed) < 2:
        raise ValueError(f"{store.path} has {len(committed)} complete episodes; the probe needs >= 2")
    states = store.all_states()  # (E, T, S), agent (x, y) = states[..., :2]
    maze = maze_of(cfg, store)

    # 1 + 2: one pass over a frame sample (streamed: a sample of large latents does not fit in memory).
    # At least MIN_PAIRS_PER_GOAL pairs per goal, so every goal has a rank correlation of its own.
    goal_count = max(1, min(N_GOALS, n_pairs // MIN_PAIRS_PER_GOAL))
    goal_ep, goal_t = _sample_frames(lengths, committed, goal_count, rng)
    goal_tokens = torch.cat(
        [read(int(e), [int(t)]) for e, t in zip(goal_ep, goal_t, strict=True)]
    )  # (G, N, D)
    heldout = None
    if heldout_episodes is not None:
        heldout = np.unique(np.asarray(list(heldout_episodes), dtype=np.int64))
        unknown = np.setdiff1d(heldout, committed)
        if len(unknown) or not len(heldout):
            raise ValueError(
                f"heldout_episodes must be complete episodes of {store.path}; not found: "
                f"{unknown.tolist()[:10] if len(heldout) else '(empty list)'}"
            )
        rest = np.setdiff1d(committed, heldout)
        if len(rest) < 2:
            raise ValueError(
                f"{len(heldout)} of {len(committed)} episodes are held out: the probe needs >= 2 to train on"
            )
        n_test = max(1, n_frames // 4)
        test_ep, test_t = _sample_frames(lengths, heldout, n_test, rng)
        train_ep, train_t = _sample_frames(lengths, rest, n_frames - len(test_ep), rng)
        mix = rng.permutation(len(test_ep) + len(train_ep))  # distance pairs draw from both
        sample_ep = np.concatenate([train_ep, test_ep])[mix]
        sample_t = np.concatenate([train_t, test_t])[mix]
    else:
        sample_ep, sample_t = _sample_frames(lengths, committed, n_frames, rng)
    M = len(sample_ep)
    n_pairs = min(n_pairs, M)
    pair_goal = np.arange(n_pairs) % len(goal_ep)  # sample i < n_pairs pairs with goal i mod G
    features: np.ndarray | None = None
    latent = np.empty(n_pairs)

    def in_model_units(tokens: torch.Tensor) -> torch.Tensor:
        # The distance and prediction errors are measured where the planner's objective measures them.
        return model_units(model, tokens)

    sums = torch.zeros(info.dim, dtype=torch.float64)
    sq_sums = torch.zeros(info.dim, dtype=torch.float64)

    def on_chunk(idx: np.ndarray, tokens: torch.Tensor) -> None:
        nonlocal features, sums, sq_sums
        f = probe_features(tokens, seed=seed)  # (m, F)
        if features is None:
            features = np.empty((M, f.shape[1]), np.float32)
        features[idx] = f
        flat = tokens.double().reshape(-1, info.dim)  # (m*N, D)
        sums += flat.sum(0)
        sq_sums += (flat**2).sum(0)
        paired = idx < n_pairs
        if paired.any():
            goals = goal_tokens[pair_goal[idx[paired]]]  # (p, N, D)
            latent[idx[paired]] = latent_distance(
                in_model_units(tokens[torch.from_numpy(paired)]), in_model_units(goals)
            )

    _read_sample(read, sample_ep, sample_t, on_chunk)
    xy = states[sample_ep, sample_t, :2].astype(np.float64)  # (M, 2)
    probe_r2, probe_info = linear_probe_r2(
        features, xy, sample_ep, seed=seed, test_groups=heldout, pca_dims=probe_dims, return_info=True
    )
    goal_xy = states[goal_ep, goal_t, :2].astype(np.float64)  # (G, 2)
    geodesic = geodesic_distance(maze, xy[:n_pairs], goal_xy[pair_goal])  # (n_pairs,)
    finite = np.isfinite(latent) & np.isfinite(geodesic)
    rho = spearman(latent[finite], geodesic[finite])
    rho_goal, n_goals = per_goal_spearman(latent, geodesic, pair_goal)
    if local_radius is None:
        local_radius = float(np.quantile(geodesic[finite], 0.25)) if finite.any() else float("nan")
    rho_local, _ = per_goal_spearman(latent, geodesic, pair_goal, radius=local_radius)
    count = M * info.num_tokens
    variance = (sq_sums / count - (sums / count) ** 2).clamp_min(0.0)  # (D,) over frames and tokens

    # 3: open-loop NMSE on the run's validation episodes, normalised as in training.
    stats = NormalizationStats.load(run_dir / "normalization.json")
    frameskip, num_hist = int(cfg["frameskip"]), int(cfg["num_hist"])
    _, val_ids = split_episodes(committed, float(cfg["split_ratio"]), int(cfg["split_seed"]))
    if len(val_ids) == 0:
        raise ValueError(
            f"run {run_dir} has no validation episodes (split_ratio={cfg['split_ratio']} of "
            f"{len(committed)}); open-loop error must be measured on held-out episodes"
        )
    longest = int(lengths[val_ids].max()) // frameskip - num_hist  # most model steps a window allows
    if longest < 1:
        raise ValueError(
            f"validation episodes of {store.path} (longest {int(lengths[val_ids].max())} steps) are too "
            f"short for num_hist={num_hist} frames + 1 step at frameskip={frameskip}"
        )
    if longest < horizons:
        warnings.warn(
            f"validation episodes allow {longest} open-loop steps, not {horizons}; NMSE stops at {longest}",
            stacklevel=2,
        )
        horizons = longest
    spec = WindowSpec(num_hist=num_hist, num_pred=horizons, frameskip=frameskip)
    windows = WindowDataset(store, val_ids, spec, stats, cache, drop_short=True)
    ids = np.linspace(0, len(windows) - 1, num=min(n_windows, len(windows))).round().astype(int)
    batch = windows.get_batch(ids)
    if cache is not None:
        visual = torch.from_numpy(batch["visual"]).float()  # (B, H+K, N, D) from fp16
    else:
        B, Fr = batch["visual"].shape[:2]
        flat = torch.from_numpy(batch["visual"]).reshape(B * Fr, *batch["visual"].shape[2:])  # (B*F, H, W, 3)
        with torch.no_grad():
            visual = torch.cat(
                [encoder.encode(flat[s : s + 64].to(device)).float().cpu() for s in range(0, B * Fr, 64)]
            )
        visual = visual.reshape(B, Fr, *visual.shape[1:])  # (B, H+K, N, D)
    pred = open_loop_predictions(model, visual, batch["proprio"], batch["actions"], horizons)  # model units
    if model.cfg.latent_norm == "channel":  # the pooled variance of the standardised channels
        variance = variance / model.visual_scale.detach().double().cpu() ** 2
    visual = in_model_units(visual)  # (B, H+K, N, D), compared with pred in the objective's units
    nmse = normalized_mse(pred, visual[:, num_hist : num_hist + horizons], variance)
    errors = prediction_errors(
        pred, visual[:, num_hist : num_hist + horizons], visual[:, num_hist - 1], mean_step_change(visual)
    )

    # 4: cost per frame and encoder speed.
    dtype = np.dtype(cache.metadata.get("dtype", "float16") if cache is not None else "float16")
    first = int(committed[0])
    frames = store.frames(first, np.arange(min(throughput_batch, int(lengths[first]))))  # (b, H, W, 3)
    row = {
        "encoder": str(cfg["encoder"]["name"]),
        "probe_r2": float(probe_r2),
        "probe_dims": probe_info["pca_dims"],
        "probe_split": "heldout" if heldout is not None else "random",
        "probe_test_episodes": probe_info["n_test_episodes"],
        "distance_spearman_per_goal": float(rho_goal),
        "distance_spearman_local": float(rho_local),
        "local_radius": float(local_radius),
        "n_goals": int(n_goals),
        "distance_spearman": float(rho),
        "mse_by_horizon": [float(v) for v in errors["mse"]],
        "copy_last_mse_by_horizon": [float(v) for v in errors["copy_last_mse"]],
        "skill_by_horizon": [float(v) for v in errors["skill"]],
        "nmse_temporal_by_horizon": [float(v) for v in errors["nmse_temporal"]],
        "worse_than_copy_last": [k + 1 for k, v in enumerate(errors["skill"]) if v > 1.0],
        "nmse_by_horizon": [float(v) for v in nmse],
        "num_tokens": int(info.num_tokens),
        "dim": int(info.dim),
        "bytes_per_frame": int(info.num_tokens * info.dim * dtype.itemsize),
        "encoder_images_per_s": float(encoder_throughput(encoder, frames)),
    }
    return row, {"latent": latent.tolist(), "geodesic": geodesic.tolist(), "goal": pair_goal.tolist()}
