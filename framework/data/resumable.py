"""ResumableDataLoader: a DataLoader whose position inside an epoch is saved in checkpoints and restored on resume.

Lightning (2.x) restores a training data loader mid-epoch only when the loader itself has ``state_dict`` /
``load_state_dict`` (its ``_Stateful`` protocol): the fit loop stores the states under ``checkpoint["loops"]
["fit_loop"]["combined_loader"]`` and hands them back before it creates the epoch's iterator. A plain DataLoader
starts the epoch over, so a run resumed mid-epoch would see its first batches twice and its last ones never.

The state is ``(epoch, batches served)``; the order itself needs no state because the batch samplers
(``framework/data/buckets.py``) draw it from ``(seed, epoch)`` alone. On load, the sampler is moved to the saved
epoch (Lightning creates the resumed iterator *before* it calls ``set_epoch``) and told to skip the served batches,
without loading them. A checkpoint written after an epoch's last batch resumes at the next epoch's start.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """A DataLoader over a batch sampler with ``epoch``, ``set_epoch`` and ``skip_batches`` (the samplers of
    ``framework.data.buckets``) whose mid-epoch position survives a checkpoint and resume."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        sampler = self.batch_sampler
        if not all(hasattr(sampler, attr) for attr in ("epoch", "set_epoch", "skip_batches")):
            raise TypeError(f"ResumableDataLoader needs a batch sampler with epoch / set_epoch / skip_batches (e.g. "
                            f"ShapeBucketBatchSampler), got {type(sampler).__name__}")
        self.batches_served = 0  # in the current epoch, including the ones skipped on resume

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.batch_sampler.epoch), "batches_served": int(self.batches_served)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, served = int(state["epoch"]), int(state["batches_served"])
        sampler = self.batch_sampler
        sampler.set_epoch(epoch)
        if served >= len(sampler):  # saved after the epoch's last batch: the next epoch starts from its beginning
            sampler.set_epoch(epoch + 1)
            served = 0
        sampler.skip_batches = served

    def __iter__(self) -> Iterator:
        skipped = self.batch_sampler.skip_batches  # read before the iterator consumes it
        iterator = super().__iter__()
        self.batches_served = skipped
        return self._count(iterator)

    def _count(self, iterator: Iterator) -> Iterator:
        for batch in iterator:
            self.batches_served += 1
            yield batch
