"""The training input pipeline: DataLoader over WindowDataset batches equals get_batch, in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wmlab.training_input import FiniteWatch, device_batches, window_loader


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_yields_the_same_batches_as_get_batch_in_order(tiny_store, workers):
    from wmlab.data.normalization import NormalizationStats
    from wmlab.data.windows import WindowDataset, WindowSpec

    store = tiny_store
    stats = NormalizationStats.compute(store.all_actions(), store.all_states(), np.asarray(store.lengths))
    dataset = WindowDataset(store, np.arange(4), WindowSpec(num_hist=2, frameskip=2), stats)
    batches = [np.array([0, 5, 9]), np.array([3]), np.array([len(dataset) - 1, 1])]
    got = list(device_batches(window_loader(dataset, batches, workers=workers, pin_memory=False), "cpu"))
    assert len(got) == len(batches)
    for ids, batch in zip(batches, got, strict=True):
        expected = dataset.get_batch(ids)
        assert set(batch) == set(expected)
        for key, value in expected.items():
            assert isinstance(batch[key], torch.Tensor)
            np.testing.assert_array_equal(batch[key].numpy(), value)


def test_device_batches_of_an_empty_loader_and_bad_arguments():
    assert list(device_batches([], "cpu")) == []
    with pytest.raises(ValueError, match="workers"):
        window_loader(object(), [], workers=-1)
    with pytest.raises(TypeError, match="__getitems__"):
        window_loader(object(), [])


def test_finite_watch_names_the_first_bad_step_and_syncs_only_every_n():
    watch = FiniteWatch(every=4)
    for _ in range(3):
        watch.add(torch.tensor(1.0))
    assert len(watch._pending) == 3 and watch.values == []  # nothing read back yet
    watch.add(torch.tensor(2.0))
    assert watch._pending == [] and watch.values == [1.0, 1.0, 1.0, 2.0]  # read back once for 4 steps
    watch.add(torch.tensor(1.0))
    watch.add(torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="step 6"):
        watch.check()


def test_finite_watch_reduces_before_reading_and_raises_the_callers_error():
    class Stop(RuntimeError):
        pass

    seen = []

    def reduce(stretch):  # stands for an all-reduce mean over ranks: a NaN on any rank stops all
        seen.append(stretch.shape)
        return stretch * torch.tensor([1.0, float("nan"), 1.0])[: len(stretch)]

    watch = FiniteWatch(every=3, reduce=reduce, describe=lambda step, v: f"bad at {step} ({v})", error=Stop)
    watch.add(torch.tensor(0.5))
    watch.add(torch.tensor(0.25))
    with pytest.raises(Stop, match=r"^bad at 1 \(nan\)$"):
        watch.add(torch.tensor(0.125))  # the third add reads the stretch back
    assert seen == [torch.Size([3])]


def test_one_loader_serves_every_epoch_with_persistent_workers(tiny_store):
    """A BatchPlan's batches change per epoch; the persistent workers read each epoch's in order."""
    from wmlab.data.normalization import NormalizationStats
    from wmlab.data.windows import WindowDataset, WindowSpec
    from wmlab.training_input import BatchPlan

    store = tiny_store
    stats = NormalizationStats.compute(store.all_actions(), store.all_states(), np.asarray(store.lengths))
    dataset = WindowDataset(store, np.arange(3), WindowSpec(num_hist=2, frameskip=2), stats)
    plan = BatchPlan()
    loader = window_loader(dataset, plan, workers=1, pin_memory=False, persistent_workers=True)
    state = torch.get_rng_state()
    for epoch_batches in ([[0, 1], [2]], [[7, 3, 4]], []):
        plan.set(epoch_batches)
        got = [batch["actions"] for batch in loader]
        assert len(got) == len(epoch_batches)
        for ids, actions in zip(epoch_batches, got, strict=True):
            np.testing.assert_array_equal(actions.numpy(), dataset.get_batch(ids)["actions"])
    assert torch.equal(torch.get_rng_state(), state), "iterating the loader must not draw from the global RNG"
