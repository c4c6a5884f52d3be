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
reading, copying and computing overlap. ``wmlab.train`` builds one loader per run over a ``BatchPlan``
(set to each epoch's batches), so persistent workers serve every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader

from wmlab.integrity import NonFiniteError


def _identity(batch):
    return batch


class BatchPlan:
    """A batch sampler whose index batches are replaced every epoch (``set``), so one DataLoader, and
    its persistent workers, serve every epoch of a run in the order the trainer chose."""

    def __init__(self, batches: Iterable = ()) -> None:
        self.set(batches)

    def set(self, batches: Iterable) -> None:
        self.batches = [list(map(int, b)) for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def window_loader(
    dataset,
    batches: Iterable | BatchPlan,
    *,
    workers: int = 2,
    pin_memory: bool | None = None,
    prefetch_factor: int = 4,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader yielding one dict of tensors per index batch in ``batches`` (in that order).

    batches: index arrays, or a ``BatchPlan`` (its batches may change between epochs).
    workers: reader processes (0: read in this process). pin_memory: default on when CUDA is there.
    prefetch_factor: batches each worker reads ahead. The loader has its own generator, so iterating
    it never draws from the global torch RNG (dropout streams do not depend on ``workers``).
    """
    if workers < 0:
        raise ValueError(f"window_loader: workers must be >= 0, got {workers}")
    if not hasattr(dataset, "__getitems__"):
        raise TypeError(f"window_loader: {type(dataset).__name__} needs __getitems__(ids) -> dict of tensors")
    pin = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
    kwargs = {}
    if workers > 0:
        kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": persistent_workers}
    plan = batches if isinstance(batches, BatchPlan) else BatchPlan(batches)
    return DataLoader(
        dataset,
        batch_sampler=plan,
        collate_fn=_identity,  # __getitems__ already returns the stacked batch
        num_workers=workers,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(0),  # worker seeds; the readers draw no randomness
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
    """Checks losses for NaN/inf without a host sync per step.

    The losses stay on the device and are read back every ``every`` steps (and at ``check()``): one
    sync per stretch. ``reduce`` (e.g. an all-reduce mean over DDP ranks) is applied to the stretch
    (k,) before it is read, so every rank sees the same values and stops at the same step. ``values``
    holds every finite value read so far (what a caller logs); ``check`` raises ``error`` (default
    ``NonFiniteError``) at the first bad step, with the message ``describe(step, value)`` (step:
    0-based count of ``add`` calls).
    """

    def __init__(
        self,
        every: int = 50,
        *,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        describe: Callable[[int, float], str] | None = None,
        error: type[Exception] = NonFiniteError,
    ) -> None:
        if every < 1:
            raise ValueError(f"FiniteWatch: every must be >= 1, got {every}")
        self.every, self.reduce, self.describe, self.error = int(every), reduce, describe, error
        self.steps = 0
        self.values: list[float] = []
        self._pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self._pending.append(loss.detach().float().reshape(()))
        self.steps += 1
        if len(self._pending) >= self.every:
            self.check()

    def check(self) -> list[float]:
        """Read the pending losses back (one sync); returns them, or raises at the first bad one."""
        if not self._pending:
            return []
        stretch = torch.stack(self._pending)  # (k,) on the device
        first = self.steps - len(self._pending)
        self._pending = []
        if self.reduce is not None:
            stretch = self.reduce(stretch)
        values = stretch.cpu()  # the one sync for the whole stretch
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            offset = int((~finite).nonzero()[0, 0])
            step, value = first + offset, float(values[offset])
            if self.describe is not None:
                raise self.error(self.describe(step, value))
            raise self.error(
                f"training loss became {value} at step {step + 1}; lower the learning rate or check the "
                "inputs"
            )
        out = values.tolist()
        self.values.extend(out)
        return out
