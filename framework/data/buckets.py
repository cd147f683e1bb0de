"""Buckets and batch samplers for native-size training.

Native-size training keeps every clip near its own duration, resolution and aspect ratio. Two ways to batch such data:

* **Buckets** (``BucketGrid`` + ``ShapeBucketBatchSampler``): a grid of (area class x aspect ratio x frame count)
  target sizes, as in SDXL's aspect-ratio buckets and Open-Sora's (resolution, frames, aspect) buckets. Each sample
  goes to the nearest bucket -- nearest aspect ratio in log space, the largest area that needs no upscaling, the
  longest frame count it has -- and is resized keeping its aspect ratio, then centre-cropped by the small remainder.
  A batch holds one bucket, so attention runs as one dense call; each bucket's batch size follows a token budget,
  so a batch of short low-resolution clips and a batch of long high-resolution clips cost about the same.
* **Packing** (``TokenBudgetBatchSampler``): samples of different sizes go into one batch until its token budget is
  full; the denoiser sees one packed sequence (``framework.layers.packing.PackedSequence``) and block-diagonal attention,
  so no padding is computed on (NaViT, Dehghani et al. 2023).

Both samplers are DDP aware: every rank draws the same global list of batches from ``(seed, epoch)`` and takes every
``world_size``-th one, so ranks see distinct samples and the same number of batches (the list is padded by repeating
its first batches when it does not divide evenly, like ``DistributedSampler``; ``drop_last`` drops them instead).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.utils.data import Sampler


# ------------------------------------------------------------------------------------------------------ buckets
@dataclass(frozen=True, order=True)
class Bucket:
    """A target video size: every sample in the bucket is resized and cropped to exactly (frames, height, width)."""

    frames: int
    height: int
    width: int

    @property
    def aspect_ratio(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.frames, self.height, self.width


@dataclass
class TokenGeometry:
    """How a video size becomes a token count: the compressor's factors and the patcher's patch size.

    Must match the model's compressor and patcher (the data module cannot see the model); a size that they cannot
    represent is rejected when the buckets are built, naming the bucket and the dimension.
    """

    patch_t: int = 1
    patch_h: int = 2
    patch_w: int = 2
    temporal_factor: int = 1
    spatial_factor: int = 1
    causal: bool = False

    def latent_frames(self, frames: int) -> int:
        tf = self.temporal_factor
        if self.causal:
            if frames < 1 or (frames - 1) % tf:
                raise ValueError(f"frames {frames} must be 1 + k*{tf} for a causal compressor")
            return 1 + (frames - 1) // tf
        if frames < 1 or frames % tf:
            raise ValueError(f"frames {frames} must be a positive multiple of the temporal factor {tf}")
        return frames // tf

    def tokens(self, bucket: Bucket) -> int:
        """Token count of one sample of ``bucket``; raises ValueError naming the dimension that does not fit."""
        t = self.latent_frames(bucket.frames)
        if t % self.patch_t:
            raise ValueError(f"bucket {bucket.shape}: latent frames {t} not divisible by patch_t {self.patch_t}")
        grid = [t // self.patch_t]
        for name, size, patch in (("height", bucket.height, self.patch_h), ("width", bucket.width, self.patch_w)):
            step = self.spatial_factor * patch
            if size % step:
                raise ValueError(f"bucket {bucket.shape}: {name} {size} is not a multiple of {step} "
                                 f"(spatial_factor {self.spatial_factor} x patch {patch})")
            grid.append(size // step)
        return math.prod(grid)


@dataclass
class BucketConfig:
    """The bucket grid: every combination of area class, aspect ratio and frame count is one bucket.

    ``resolutions`` are area classes given as the side of a square of that area (256 -> about 256*256 pixels at every
    aspect ratio); ``aspect_ratios`` are width / height; heights and widths are rounded to ``size_multiple`` (the
    compressor's spatial factor times the patch size, or a multiple of it). A sample whose aspect ratio is further
    than ``aspect_tolerance`` (in ``|log(bucket / sample)|``, so 0.2 allows about 18 % of one side to be cropped)
    from every bucket's is skipped, as is one smaller than every bucket by more than ``max_upscale``.
    """

    resolutions: list[int] = field(default_factory=lambda: [256])
    aspect_ratios: list[float] = field(default_factory=lambda: [16 / 9, 4 / 3, 1.0, 3 / 4, 9 / 16])
    frame_counts: list[int] = field(default_factory=lambda: [1, 16])
    size_multiple: int = 16
    aspect_tolerance: float = 0.2
    max_upscale: float = 1.0


class BucketGrid:
    """Builds the buckets of a ``BucketConfig`` and assigns samples to them."""

    def __init__(self, config: BucketConfig) -> None:
        if not config.resolutions or not config.aspect_ratios or not config.frame_counts:
            raise ValueError(f"BucketConfig needs at least one resolution, aspect ratio and frame count, got {config}")
        for name in ("resolutions", "frame_counts"):
            bad = [v for v in getattr(config, name) if v < 1]
            if bad:
                raise ValueError(f"BucketConfig.{name} must be positive, got {bad}")
        if any(a <= 0 for a in config.aspect_ratios):
            raise ValueError(f"BucketConfig.aspect_ratios must be > 0, got {config.aspect_ratios}")
        if config.size_multiple < 1 or config.aspect_tolerance < 0 or config.max_upscale < 1:
            raise ValueError(f"BucketConfig: size_multiple >= 1, aspect_tolerance >= 0, max_upscale >= 1; got {config}")
        self.config = config
        self.frame_counts = sorted(set(config.frame_counts))
        m = config.size_multiple
        # one (height, width) per (area class, aspect ratio), smallest area first
        self.sizes: dict[float, list[tuple[int, int]]] = {}
        for aspect in sorted(set(config.aspect_ratios)):
            sizes = set()
            for side in config.resolutions:  # nearest multiple of m, halves rounded up (not to even)
                h = max(m, math.floor(side / math.sqrt(aspect) / m + 0.5) * m)
                w = max(m, math.floor(side * math.sqrt(aspect) / m + 0.5) * m)
                sizes.add((h, w))
            self.sizes[aspect] = sorted(sizes, key=lambda s: s[0] * s[1])
        self.buckets: list[Bucket] = sorted(
            Bucket(f, h, w) for sizes in self.sizes.values() for h, w in sizes for f in self.frame_counts
        )

    def assign(self, frames: int, height: int, width: int) -> Bucket | str:
        """Nearest bucket for a sample with ``frames`` usable frames of ``height`` x ``width``, or why there is none.

        Aspect ratio first (nearest in log space, compared with the bucket's rounded size), then the largest area
        class that needs at most ``max_upscale``, then the longest frame count the sample has.
        """
        if frames < 1 or height < 1 or width < 1:
            return f"empty sample ({frames} frames of {width}x{height})"
        aspect = width / height
        nominal = min(self.sizes, key=lambda a: abs(math.log(a / aspect)))  # the aspect class, before rounding
        sizes = self.sizes[nominal]
        fitting = [
            (h, w) for h, w in sizes
            if abs(math.log(w / h / aspect)) <= self.config.aspect_tolerance
            and max(h / height, w / width) <= self.config.max_upscale
        ]
        if not fitting:
            if all(abs(math.log(w / h / aspect)) > self.config.aspect_tolerance for h, w in sizes):
                return (f"aspect ratio {aspect:.3f} ({width}x{height}) is further than "
                        f"{self.config.aspect_tolerance} (log) from every bucket's")
            h, w = sizes[0]
            return f"{width}x{height} is smaller than the smallest bucket {w}x{h} for its aspect ratio"
        counts = [f for f in self.frame_counts if f <= frames]
        if not counts:
            return f"{frames} frames is shorter than the shortest bucket ({self.frame_counts[0]} frames)"
        h, w = fitting[-1]
        return Bucket(counts[-1], h, w)


def resize_crop_plan(height: int, width: int, target_height: int, target_width: int) -> tuple[int, int, int, int]:
    """Aspect-preserving resize that covers the target, then a centre crop: -> (resized h, resized w, top, left).

    The scale is the smallest that covers both target sides, so only the side whose aspect ratio overshoots is
    cropped, by as little as possible.
    """
    scale = max(target_height / height, target_width / width)
    rh, rw = max(target_height, round(height * scale)), max(target_width, round(width * scale))
    return rh, rw, (rh - target_height) // 2, (rw - target_width) // 2


# ------------------------------------------------------------------------------------------------- DDP helpers
def distributed_rank_and_size(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed's when initialised; else a single process."""
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def shard_batches(batches: list[list[int]], rank: int, world_size: int, drop_last: bool) -> list[list[int]]:
    """This rank's share of a global batch list: every ``world_size``-th batch, the same count on every rank."""
    if world_size == 1:
        return batches
    if drop_last:
        batches = batches[: len(batches) // world_size * world_size]
    elif len(batches) % world_size:
        missing = world_size - len(batches) % world_size
        batches = batches + [batches[i % len(batches)] for i in range(missing)]  # repeat, like DistributedSampler
    return batches[rank::world_size]


class _EpochForwarder:
    """Lightning calls ``set_epoch`` on ``dataloader.sampler`` and ``batch_sampler.sampler``, never on a batch sampler
    itself; as a batch sampler's ``sampler`` this hands the call on, so every epoch gets a new order."""

    def __init__(self, owner: _EpochBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class _EpochBatches:
    """One epoch's batches as a stateful iterator. torchdata's ``StatefulDataLoader`` saves its ``state_dict``
    (epoch, batches handed out) in checkpoints and restores it on resume: the epoch matters because Lightning creates
    a resumed epoch's iterator *before* it calls ``set_epoch`` (a resume into epoch > 0 would replay epoch 0's
    order); the position needs no indices because the order is a function of ``(seed, epoch)``."""

    def __init__(self, owner: _EpochBatchSampler) -> None:
        self.owner, self.epoch, self.yielded = owner, owner.epoch, 0
        self.batches = owner.batches()

    def __iter__(self) -> _EpochBatches:
        return self

    def __next__(self) -> list[int]:
        if self.yielded >= len(self.batches):
            raise StopIteration
        self.yielded += 1
        return self.batches[self.yielded - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "yielded": int(self.yielded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, yielded = int(state["epoch"]), int(state["yielded"])
        self.owner.set_epoch(epoch)
        if yielded >= len(self.owner):  # saved after the epoch's last batch: the next epoch starts from its beginning
            self.owner.set_epoch(epoch + 1)
            yielded = 0
        self.epoch, self.yielded, self.batches = self.owner.epoch, yielded, self.owner.batches()


class _EpochBatchSampler(Sampler[list[int]]):
    """Shared epoch / rank bookkeeping: subclasses build ``global_batches()`` from ``(seed, epoch)``."""

    def __init__(self, seed: int, shuffle: bool, drop_last: bool, rank: int | None, world_size: int | None) -> None:
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = distributed_rank_and_size(rank, world_size)
        self.epoch = 0
        self.sampler = _EpochForwarder(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}")  # same on every rank and process

    def global_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch."""
        return shard_batches(self.global_batches(), self.rank, self.world_size, self.drop_last)

    def __iter__(self) -> _EpochBatches:
        return _EpochBatches(self)

    def __len__(self) -> int:
        return len(self.batches())


class ShapeBucketBatchSampler(_EpochBatchSampler):
    """Yields batches of indices that share a bucket key (e.g. a shape); the order depends only on (seed, epoch).

    ``batch_size`` is one size for all buckets or a mapping from key to size (from a token budget, see
    ``token_budget_batch_sizes``). With several processes (DDP) each rank gets distinct batches, the same number.
    """

    def __init__(
        self, shapes: Sequence[Hashable], batch_size: int | Mapping[Hashable, int], seed: int = 0,
        shuffle: bool = True, drop_last: bool = False, rank: int | None = None, world_size: int | None = None,
    ) -> None:
        if isinstance(shapes, Sampler):  # Lightning injecting a DistributedSampler (use_distributed_sampler=True)
            raise TypeError(
                f"{type(self).__name__} shards batches across DDP ranks itself; set "
                "trainer.use_distributed_sampler=false instead of letting Lightning inject a DistributedSampler"
            )
        super().__init__(seed, shuffle, drop_last, rank, world_size)
        self.buckets: dict[Hashable, list[int]] = {}
        for index, shape in enumerate(shapes):
            self.buckets.setdefault(tuple(shape) if isinstance(shape, list) else shape, []).append(index)
        sizes = batch_size.values() if isinstance(batch_size, Mapping) else [batch_size]
        if any(s < 1 for s in sizes):
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(batch_size, Mapping):
            missing = [k for k in self.buckets if k not in batch_size]
            if missing:
                raise ValueError(f"no batch size for buckets {missing[:5]}")
        self.batch_size = batch_size

    def bucket_batch_size(self, key: Hashable) -> int:
        return self.batch_size[key] if isinstance(self.batch_size, Mapping) else self.batch_size

    def global_batches(self) -> list[list[int]]:
        rng = self._rng()
        batches = []
        for key in sorted(self.buckets):
            indices, size = list(self.buckets[key]), self.bucket_batch_size(key)
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), size):
                batch = indices[start : start + size]
                # drop_last drops partial batches; it does not drop whole buckets smaller than one batch
                if len(batch) == size or not self.drop_last or start == 0:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches


def token_budget_batch_sizes(
    buckets: Sequence[Bucket], geometry: TokenGeometry, tokens_per_batch: int, max_batch_size: int | None = None
) -> dict[Bucket, int]:
    """Per-bucket batch size: as many samples as fit in ``tokens_per_batch`` tokens (at least one)."""
    sizes = {}
    for bucket in buckets:
        size = max(1, tokens_per_batch // geometry.tokens(bucket))
        sizes[bucket] = min(size, max_batch_size) if max_batch_size else size
    return sizes


class TokenBudgetBatchSampler(_EpochBatchSampler):
    """Packs samples of mixed sizes into batches of at most ``tokens_per_batch`` tokens (first fit over open batches).

    Samples are shuffled, then each goes into the first of ``open_batches`` partly filled batches it fits in; when
    none has room, the fullest is closed. A sample larger than the budget forms a batch of its own.
    """

    def __init__(
        self, token_counts: Sequence[int], tokens_per_batch: int, seed: int = 0, shuffle: bool = True,
        drop_last: bool = False, rank: int | None = None, world_size: int | None = None, open_batches: int = 8,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__(seed, shuffle, drop_last, rank, world_size)
        if tokens_per_batch < 1 or open_batches < 1:
            raise ValueError(f"tokens_per_batch and open_batches must be >= 1, got {tokens_per_batch}, {open_batches}")
        self.token_counts = [int(n) for n in token_counts]
        self.tokens_per_batch, self.open_batches, self.max_batch_size = tokens_per_batch, open_batches, max_batch_size

    def global_batches(self) -> list[list[int]]:
        order = list(range(len(self.token_counts)))
        if self.shuffle:
            self._rng().shuffle(order)
        closed: list[list[int]] = []
        open_: list[tuple[int, list[int]]] = []  # (tokens used, indices)
        for index in order:
            n = self.token_counts[index]
            for slot, (used, batch) in enumerate(open_):
                if used + n <= self.tokens_per_batch and (not self.max_batch_size or len(batch) < self.max_batch_size):
                    batch.append(index)
                    open_[slot] = (used + n, batch)
                    break
            else:
                if len(open_) == self.open_batches:
                    fullest = max(range(len(open_)), key=lambda s: open_[s][0])
                    closed.append(open_.pop(fullest)[1])
                open_.append((n, [index]))
        closed.extend(batch for _, batch in open_)
        if self.shuffle:
            self._rng().shuffle(closed)
        return closed
