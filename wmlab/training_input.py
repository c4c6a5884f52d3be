"""The training input pipeline: windows through a DataLoader (workers, pinned memory, prefetch) and
non-blocking copies to the device, plus a NaN check that does not sync the host every step.

    loader = window_loader(train_set, batches, workers=4)        # batches: index arrays (epoch_batches)
    for batch in device_batches(loader, device):                  # tensors already on the device
        loss, _ = model(batch); ...; watch.add(loss)              # watch = FiniteWatch(every=50)
    watch.check()                                                 # raises at the first bad step

``dataset`` is anything with ``__getitems__(ids) -> dict of tensors`` (``WindowDataset`` over a
feature cache or frames): a whole batch is read in one call inside a worker, and its tensors come
back through shared memory. On CUDA the batches are pinned by the loader's pin-memory thread, and
``device_batches`` issues the next batch's host-to-device copy before the current batch is used, so
reading, copying and computing overlap. ``train.py`` can swap its ``_batch_to(train_set.get_batch
(ids), device)`` loop for ``device_batches(window_loader(train_set, batches, ...), device)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from wmlab.integrity import NonFiniteError


def _identity(batch):
    return batch


def window_loader(
    dataset,
    batches: Iterable,
    *,
    workers: int = 2,
    pin_memory: bool | None = None,
    prefetch_factor: int = 4,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader yielding one dict of tensors per index batch in ``batches`` (in that order).

    workers: reader processes (0: read in this process). pin_memory: default on when CUDA is there.
    prefetch_factor: batches each worker reads ahead.
    """
    if workers < 0:
        raise ValueError(f"window_loader: workers must be >= 0, got {workers}")
    if not hasattr(dataset, "__getitems__"):
        raise TypeError(f"window_loader: {type(dataset).__name__} needs __getitems__(ids) -> dict of tensors")
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    kwargs = {}
    if workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers}
    return DataLoader(
        dataset,
        batch_sampler=[list(map(int, b)) for b in batches],
        collate_fn=_identity,  # __getitems__ already returns the stacked batch
        num_workers=workers,
        pin_memory=pin,
        **kwargs,
    )


def device_batches(loader: Iterable[dict], device) -> Iterator[dict]:
    """Each batch of ``loader`` on ``device``, copied ``non_blocking`` one batch ahead (on CUDA the
    copy of batch i + 1 runs while batch i is computed; from pinned memory it is asynchronous)."""
    device = torch.device(device)

    def to(batch: dict) -> dict:
        return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}

    it = iter(loader)
    try:
        nxt = to(next(it))
    except StopIteration:
        return
    for batch in it:
        current, nxt = nxt, to(batch)
        yield current
    yield nxt


class FiniteWatch:
    """Checks losses for NaN/inf without a host sync per step: the per-step finiteness is kept on the
    device and read every ``every`` steps (and at ``check()``). ``check`` raises ``FloatingPointError``
    naming the first bad step."""

    def __init__(self, every: int = 50) -> None:
        self.every, self.steps, self._flags = int(every), 0, []

    def add(self, loss: torch.Tensor) -> None:
        self._flags.append(torch.isfinite(loss.detach()).reshape(()))
        self.steps += 1
        if len(self._flags) >= self.every:
            self.check()

    def check(self) -> None:
        if not self._flags:
            return
        flags = torch.stack(self._flags).cpu()  # one sync for the whole stretch
        first = self.steps - len(self._flags)
        self._flags = []
        if not bool(flags.all()):
            bad = first + int((~flags).nonzero()[0, 0])
            raise NonFiniteError(
                f"training loss became NaN/inf at step {bad + 1}; lower the learning rate or check the inputs"
            )
