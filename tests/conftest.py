"""Shared fixtures: tiny datasets built once per session, the shared/ fixtures folder."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """6 random-policy PointMaze episodes of 30 steps at 32 px, collected in-process."""
    from wmlab.data.collect import collect

    out = tmp_path_factory.mktemp("data") / "tiny.zarr"
    return collect(
        out, n_episodes=6, episode_len=30, workers=1, seed=3, env_kwargs={"img_size": 32}, progress=False
    )


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine run far faster (and steadier) on one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def hydra_records_outside_the_repository(tmp_path_factory):
    """Verbs run as Hydra apps write their .hydra records under WMLAB_HYDRA_DIR (default ./outputs/hydra):
    keep every test's records in a session tmp dir, never in the checkout (subprocesses inherit it)."""
    import os

    previous = os.environ.get("WMLAB_HYDRA_DIR")
    os.environ["WMLAB_HYDRA_DIR"] = str(tmp_path_factory.mktemp("hydra_records"))
    yield
    if previous is None:
        os.environ.pop("WMLAB_HYDRA_DIR", None)
    else:
        os.environ["WMLAB_HYDRA_DIR"] = previous
