"""Buckets and batch samplers: aspect ratio kept within tolerance, no upscaling, token-budget batch sizes, packing
within a token budget, and DDP ranks that get distinct samples and the same number of batches."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from framework.data.buckets import (
    Bucket,
    BucketConfig,
    BucketGrid,
    ShapeBucketBatchSampler,
    TokenBudgetBatchSampler,
    TokenGeometry,
    resize_crop_plan,
    token_budget_batch_sizes,
)

CONFIG = BucketConfig(resolutions=[128, 256, 512], aspect_ratios=[16 / 9, 4 / 3, 1.0, 3 / 4, 9 / 16],
                      frame_counts=[1, 9, 17, 33], size_multiple=16, aspect_tolerance=0.15)
GRID = BucketGrid(CONFIG)


def random_sizes(n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        aspect = math.exp(rng.uniform(math.log(9 / 16) - 0.1, math.log(16 / 9) + 0.1))
        area = rng.uniform(100, 1100) ** 2
        h = max(8, round(math.sqrt(area / aspect)))
        sizes.append((rng.choice([1, 5, 12, 40, 120]), h, max(8, round(h * aspect))))
    return sizes


def test_buckets_are_multiples_of_the_size_multiple_and_cover_the_grid():
    assert all(b.height % 16 == 0 and b.width % 16 == 0 for b in GRID.buckets)
    assert len(GRID.buckets) == 3 * 5 * 4
    for b in GRID.buckets:  # each area class stays within rounding of its nominal area
        assert min(abs(b.height * b.width / s**2 - 1) for s in CONFIG.resolutions) < 0.15


def test_assignment_keeps_aspect_ratio_within_tolerance_and_never_upscales():
    assigned = 0
    for frames, height, width in random_sizes(400):
        bucket = GRID.assign(frames, height, width)
        if isinstance(bucket, str):
            assert "smaller than the smallest bucket" in bucket or "further than" in bucket, bucket
            continue
        assigned += 1
        assert abs(math.log(bucket.aspect_ratio / (width / height))) <= CONFIG.aspect_tolerance
        assert bucket.height <= height and bucket.width <= width  # max_upscale = 1
        assert bucket.frames == max(f for f in CONFIG.frame_counts if f <= frames)
        # the largest area class that fits: the next larger bucket of the same aspect class would need upscaling
        same_class = [b for b in GRID.buckets if b.frames == bucket.frames
                      and abs(math.log(b.aspect_ratio / bucket.aspect_ratio)) < 0.1 and b.height > bucket.height]
        assert all(b.height > height or b.width > width for b in same_class)
    assert assigned > 300


def test_unfitting_samples_say_why():
    assert "smaller than the smallest bucket" in GRID.assign(1, 60, 60)
    assert "further than 0.15" in GRID.assign(1, 200, 800)  # 4:1 panorama
    assert "shorter than the shortest bucket" in BucketGrid(BucketConfig(frame_counts=[8])).assign(4, 512, 512)
    assert GRID.assign(3, 600, 600) == Bucket(1, 512, 512)  # a 3-frame video takes the 1-frame bucket


@pytest.mark.parametrize("source, target", [((720, 1280), (288, 512)), ((1080, 1080), (432, 768)),
                                            ((1280, 720), (512, 288)), ((480, 640), (384, 384))])
def test_resize_covers_the_target_and_crops_only_the_overshooting_side(source, target):
    rh, rw, top, left = resize_crop_plan(*source, *target)
    assert rh >= target[0] and rw >= target[1]
    assert min(top, left) == 0  # only one side is cropped
    assert abs(rw / rh - source[1] / source[0]) < 2 / min(rh, rw)  # aspect preserved up to rounding
    assert top == (rh - target[0]) // 2 and left == (rw - target[1]) // 2  # centred


def test_token_budget_batch_sizes():
    geometry = TokenGeometry(patch_t=1, patch_h=2, patch_w=2, temporal_factor=4, spatial_factor=8, causal=True)
    assert geometry.tokens(Bucket(17, 256, 512)) == 5 * 16 * 32
    sizes = token_budget_batch_sizes(GRID.buckets, geometry, tokens_per_batch=32768)
    for bucket, size in sizes.items():
        tokens = geometry.tokens(bucket)
        assert size == max(1, 32768 // tokens)
        assert size * tokens <= 32768 or size == 1
    assert token_budget_batch_sizes([Bucket(1, 128, 128)], geometry, 32768, max_batch_size=4)[Bucket(1, 128, 128)] == 4
    with pytest.raises(ValueError, match=r"frames 16 must be 1 \+ k\*4"):
        geometry.tokens(Bucket(16, 256, 256))
    with pytest.raises(ValueError, match="width 40 is not a multiple of 16"):
        geometry.tokens(Bucket(1, 256, 40))


# ----------------------------------------------------------------------------------------------- bucket sampler
def bucket_keys(n: int, seed: int = 0) -> list[Bucket]:
    rng = random.Random(seed)
    return [rng.choice(GRID.buckets[:6]) for _ in range(n)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_ranks_get_disjoint_samples_and_the_same_number_of_batches(world_size, drop_last):
    keys = bucket_keys(103)
    sizes = {b: 1 + i % 4 for i, b in enumerate(GRID.buckets)}
    ranks = [ShapeBucketBatchSampler(keys, sizes, seed=3, drop_last=drop_last, rank=r, world_size=world_size)
             for r in range(world_size)]
    per_rank = [s.batches() for s in ranks]
    assert len({len(b) for b in per_rank}) == 1 and all(len(s) == len(per_rank[0]) for s in ranks)
    for batches in per_rank:
        for batch in batches:
            assert len({keys[i] for i in batch}) == 1  # one bucket per batch
            assert len(batch) <= sizes[keys[batch[0]]]
    seen = [set(i for b in batches for i in b) for batches in per_rank]
    everything = set().union(*seen)
    if drop_last:
        assert all(a.isdisjoint(b) for a, b in itertools.combinations(seen, 2))
    else:
        assert everything == set(range(len(keys)))  # every sample is used
        # ranks overlap only in the few batches repeated to even out the count
        repeated = sum(len(s) for s in seen) - len(everything)
        assert repeated <= (world_size - 1) * max(sizes.values())


def test_bucket_sampler_order_depends_on_seed_and_epoch_only():
    keys = bucket_keys(50)
    a, b = ShapeBucketBatchSampler(keys, 4, seed=1), ShapeBucketBatchSampler(keys, 4, seed=1)
    assert a.batches() == b.batches()
    a.set_epoch(1)
    assert a.batches() != b.batches()
    assert sorted(i for batch in a.batches() for i in batch) == list(range(50))


def test_lightning_sampler_injection_is_refused_with_advice():
    from torch.utils.data import SequentialSampler

    with pytest.raises(TypeError, match="use_distributed_sampler=false"):
        ShapeBucketBatchSampler(SequentialSampler(range(4)), batch_size=2)


# ---------------------------------------------------------------------------------------------- packing sampler
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_packing_respects_the_budget_and_uses_every_sample_once(world_size):
    rng = random.Random(0)
    counts = [rng.choice([64, 96, 256, 512, 1200]) for _ in range(300)] + [5000]  # one larger than the budget
    samplers = [TokenBudgetBatchSampler(counts, 4096, seed=2, drop_last=True, rank=r, world_size=world_size)
                for r in range(world_size)]
    per_rank = [s.batches() for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    for batches in per_rank:
        for batch in batches:
            assert sum(counts[i] for i in batch) <= 4096 or batch == [300]
    seen = [[i for b in batches for i in b] for batches in per_rank]
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat))  # disjoint across ranks, no sample twice
    if world_size == 1:
        assert sorted(flat) == list(range(len(counts)))
        fill = sum(counts[:300]) / (4096 * (len(per_rank[0]) - 1))
        assert fill > 0.9, f"packed batches only {fill:.0%} full"


def test_packed_manifest_batch_round_trips_through_the_patcher_exactly(tmp_path):
    from framework.data.datamodules import Batching, ManifestVideoDataModule
    from manifest_media import mixed_media, write_manifest
    from plugins.patchers.spacetime import SpacetimePatcher

    rows, _ = mixed_media(tmp_path)
    data = ManifestVideoDataModule(
        write_manifest(tmp_path / "m.jsonl", rows), batching=Batching.PACKED, tokens_per_batch=10_000,
        buckets=BucketConfig(resolutions=[16, 24], aspect_ratios=[16 / 9, 1.0, 9 / 16], frame_counts=[1, 4, 8],
                             size_multiple=8),
        geometry=TokenGeometry(patch_h=4, patch_w=4),
    )
    batch = next(iter(data.train_dataloader()))
    assert len({tuple(v.shape) for v in batch["videos"]}) > 2  # mixed sizes in one batch
    patcher = SpacetimePatcher(1, 4, 4)
    packed = patcher.patchify(batch["videos"])
    assert not packed.is_uniform
    assert packed.tokens.shape[0] == sum(data.geometry.tokens(Bucket(*v.shape[1:])) for v in batch["videos"])
    for original, restored in zip(batch["videos"], patcher.unpatchify(packed)):
        assert torch.equal(original, restored)
    data.tokens_per_batch, data.drop_last = 64, True  # several batches, so two ranks can split them
    ranks = [set(i for b in data.batch_sampler(rank=r, world_size=2) for i in b) for r in range(2)]
    assert ranks[0] and ranks[1] and ranks[0].isdisjoint(ranks[1])
