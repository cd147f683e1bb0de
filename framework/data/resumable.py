"""The training data loader: torchdata's ``StatefulDataLoader``, whose position inside an epoch -- with or without
worker processes -- is saved in checkpoints and restored on resume.

Lightning (2.x) restores a training data loader mid-epoch only when the loader itself has ``state_dict`` /
``load_state_dict`` (its ``_Stateful`` protocol): the fit loop stores the states under ``checkpoint["loops"]
["fit_loop"]["combined_loader"]`` and hands them back before it creates the epoch's iterator. A plain DataLoader
starts the epoch over, so a run resumed mid-epoch would see its first batches twice and its last ones never.

``StatefulDataLoader`` saves, per yielded batch: the batch sampler's state (``framework/data/buckets.py``: the epoch;
the order is a function of ``(seed, epoch)``) and how many batches it has handed out, the workers' base seed, which
worker yields next, and each worker's dataset state (``ManifestVideoDataset``'s clip-start RNG). On resume it
fast-forwards the batch sampler past the served batches without loading them and gives every worker its saved
state back, so prefetching workers do not change what a resumed run sees.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from multiprocessing.context import BaseContext

from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader


def resumable_loader(
    dataset: Dataset, batch_sampler: Sampler[list[int]], collate_fn: Callable, num_workers: int = 0,
    multiprocessing_context: BaseContext | None = None,
) -> StatefulDataLoader:
    """A ``StatefulDataLoader`` over ``batch_sampler`` (a sampler of ``framework.data.buckets`` with ``state_dict``)
    whose workers, if any, persist across epochs."""
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates: noise
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        return StatefulDataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )
