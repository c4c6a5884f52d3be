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
    assert len(watch._flags) == 3  # nothing read back yet
    watch.add(torch.tensor(2.0))
    assert watch._flags == []  # read back once for 4 steps
    watch.add(torch.tensor(1.0))
    watch.add(torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="step 6"):
        watch.check()
