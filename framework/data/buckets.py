"""Batches of equal-size samples, so packed attention runs as one dense call per batch.

Native-size training keeps every clip at its own size; grouping clips of equal (frames, height, width) into the
same batch costs nothing in randomness that matters and lets the attention dispatcher use a single dense kernel
instead of a per-sample loop.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class ShapeBucketBatchSampler(Sampler[list[int]]):
    """Yields batches of indices whose samples share a shape; the order depends only on (seed, epoch)."""

    def __init__(
        self, shapes: Sequence[tuple[int, ...]], batch_size: int, seed: int = 0, shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.buckets: dict[tuple[int, ...], list[int]] = {}
        for index, shape in enumerate(shapes):
            self.buckets.setdefault(tuple(shape), []).append(index)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        batches = []
        for shape in sorted(self.buckets):
            indices = list(self.buckets[shape])
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        full = sum(len(v) // self.batch_size for v in self.buckets.values())
        partial = 0 if self.drop_last else sum(1 for v in self.buckets.values() if len(v) % self.batch_size)
        return full + partial
