"""DDP done right: equal batch counts on every rank, per-rank RNG streams, global logged figures, and a
real ``torchrun --nproc_per_node=2`` (gloo, CPU) job on uneven shards that matches one process at the same
global batch and resumes after a completed epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_configs import QUIET_CPU, TINY_MODEL, train_config

from wmlab.runs import RUN_CHECKPOINT, load_tensors
from wmlab.train import epoch_batches, lr_scale, rank_seed, train

# 115 training windows (frameskip 2, num_hist 3 on the 6-episode tiny store): shards of 58 and 57
# before dropping, i.e. 4 vs 3 batches of 19 -- the count that crashed (gloo) or would hang (NCCL).
DDP = [
    *TINY_MODEL,
    "frameskip=2",
    "num_hist=3",
    "training.val_batches=1",
    "training.rollout_eval_steps=0",
    "training.precision=fp32",
    *QUIET_CPU,
]
WINDOWS, BATCH = 115, 19


def test_every_rank_gets_the_same_batches_count_and_a_step_is_one_global_batch():
    one = epoch_batches(WINDOWS, 2 * BATCH, 0, 3, 0, 1)
    ranks = [epoch_batches(WINDOWS, BATCH, 0, 3, r, 2) for r in range(2)]
    assert [len(b) for b in ranks] == [3, 3]  # not 4 vs 3
    assert [len(b) for b in ranks[0]] == [len(b) for b in ranks[1]]
    for k in range(3):  # step k across the ranks = the single process's batch k of 2 x 19
        assert sorted(np.concatenate([ranks[0][k], ranks[1][k]])) == sorted(one[k])
    dropped = set(one[-1]) - set(np.concatenate(ranks[0] + ranks[1]))
    assert len(dropped) == WINDOWS % 2  # only the permutation's tail window
    assert not np.array_equal(
        np.concatenate(epoch_batches(WINDOWS, BATCH, 0, 4, 0, 2)), np.concatenate(ranks[0])
    )


def test_rank_seeds_differ_per_rank_and_lr_scaling():
    assert len({rank_seed(0, r) for r in range(8)} | {rank_seed(1, r) for r in range(8)}) == 16
    assert rank_seed(5, 1) == rank_seed(5, 1) and 0 <= rank_seed(5, 1) < 2**63
    assert lr_scale("none", 4) == 1.0 and lr_scale("linear", 4) == 4.0


def test_a_checkpoint_keeps_each_ranks_rng_and_restores_the_one_asked_for(tmp_path):
    from wmlab.runs import commit_checkpoint, load_checkpoint, rng_state
    from wmlab.train import input_workers

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(rank_seed(0, 0))
    rank0 = rng_state("cpu")
    torch.manual_seed(rank_seed(0, 1))
    rank1 = rng_state("cpu")
    assert set(rank0) == {"torch"}  # a CPU run saves no CUDA generator
    states = {**rank0, **{f"rank1.{k}": v for k, v in rank1.items()}}
    path = tmp_path / "checkpoint.safetensors"
    commit_checkpoint(path, model, optimizer, {"step": 1}, progress=1, rng=states)
    torch.manual_seed(123)
    load_checkpoint(path, model, optimizer, rng="rank1.")
    assert torch.equal(torch.get_rng_state(), rank1["torch"])
    load_checkpoint(path, model, optimizer, rng=True)
    assert torch.equal(torch.get_rng_state(), rank0["torch"])
    assert input_workers("auto", torch.device("cpu")) == 0 and input_workers(3, torch.device("cpu")) == 3


def test_a_bad_lr_scaling_or_workers_value_is_refused(tiny_store, tmp_path):
    from wmlab.integrity import UserError

    for override in ("training.lr_scaling=sqrt", "training.workers=-1", "training.compile=7"):
        cfg = cfg_for(tiny_store, tmp_path / "run", override)
        with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")):
            train(cfg)
    assert not (tmp_path / "run").exists()


def cfg_for(store, run_dir, *extra) -> dict:
    return train_config(DDP, store, run_dir, *extra)


def torchrun(store, run_dir, *extra) -> subprocess.CompletedProcess:
    args = [*DDP, f"data={store.path}", f"run_dir={run_dir}", f"training.batch_size={BATCH}", *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "wmlab.cli", "train", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def max_difference(run_a, run_b) -> float:
    a, b = load_tensors(run_a / "model.safetensors"), load_tensors(run_b / "model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_torchrun_uneven_shards_train_match_one_process_and_resume(tiny_store, tmp_path):
    run = tmp_path / "ddp"
    torchrun(tiny_store, run, "training.epochs=1")
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["windows"]["train"] == WINDOWS
    assert meta["distributed"]["world_size"] == 2 and meta["distributed"]["global_batch_size"] == 2 * BATCH
    assert meta["global_step"] == 3  # 57 windows a rank: 3 batches on each
    assert meta["history"][0]["replica_max_abs_difference"] == 0.0  # the replicas are bitwise identical
    first = meta["history"][0]  # windows/s counts both ranks' windows (2 x 57), not rank 0's
    assert abs(first["train_windows_per_second"] * first["epoch_seconds"] - 2 * 57) < 1e-6
    assert meta["precision"]["chosen"] == "fp32"  # rank 0's decision, shared with rank 1
    ckpt = load_tensors(run / RUN_CHECKPOINT)
    assert not torch.equal(ckpt["rng.torch"], ckpt["rng.rank1.torch"])  # each rank's own stream is saved

    # One process at the same global batch (2 x 19) and the same 3 steps: the same model, to rounding.
    single = train(cfg_for(tiny_store, tmp_path / "one", "training.batch_size=38",
                           "training.max_steps_per_epoch=3", "training.epochs=1"))  # fmt: skip
    one = json.loads((single / "metadata.json").read_text())
    loss_difference = abs(one["history"][0]["train_loss"] - meta["history"][0]["train_loss"])
    assert loss_difference < 1e-6 * max(1.0, abs(one["history"][0]["train_loss"]))  # the loss is global
    weights_ddp, weights_one = (
        load_tensors(run / "model.safetensors"),
        load_tensors(single / "model.safetensors"),
    )
    weight_difference = max(float((weights_ddp[k] - weights_one[k]).abs().max()) for k in weights_one)
    assert weight_difference < 1e-5, weight_difference

    # Resume after the completed epoch, still under torchrun; it continues like the single process does.
    torchrun(tiny_store, run, "training.epochs=2")
    meta = json.loads((run / "metadata.json").read_text())
    assert [h["epoch"] for h in meta["history"]] == [1, 2] and meta["global_step"] == 6
    assert meta["history"][1]["replica_max_abs_difference"] == 0.0
    single = train(cfg_for(tiny_store, tmp_path / "one", "training.batch_size=38",
                           "training.max_steps_per_epoch=3", "training.epochs=2"))  # fmt: skip
    weights_ddp, weights_one = (
        load_tensors(run / "model.safetensors"),
        load_tensors(single / "model.safetensors"),
    )
    resumed_difference = max(float((weights_ddp[k] - weights_one[k]).abs().max()) for k in weights_one)
    assert resumed_difference < 1e-5, resumed_difference
    print(f"DDP vs one process: loss {loss_difference:.3g}, weights {weight_difference:.3g}, "
          f"after resume {resumed_difference:.3g}")  # fmt: skip
