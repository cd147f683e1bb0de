"""Lightning data modules. Training batches are dicts of lists, because samples may differ in size."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from framework.core.errors import UsageError
from framework.data.buckets import (
    Bucket,
    BucketConfig,
    BucketGrid,
    ShapeBucketBatchSampler,
    TokenBudgetBatchSampler,
    TokenGeometry,
    token_budget_batch_sizes,
)
from framework.data.manifest import (
    ClipSampling,
    ManifestVideoDataset,
    SkippedSamples,
    SkippedSamplesReport,
    empty_captions_message,
    read_manifest,
)
from framework.data.prompts import PromptDataset, Prompts, collate_prompts, load_prompt_requests
from framework.data.resumable import resumable_loader
from framework.data.synthetic import SyntheticMovingShapes
from framework.data.video_io import decoding_worker_context

log = logging.getLogger("kinetoscope.data")


def collate_videos(samples: list[dict]) -> dict:
    """-> {"videos": list of [C, T, H, W], "captions": list[str], "ids": list[str], "fps": list[float],
    "original_sizes": list of (height, width)}.

    ``fps`` and ``original_sizes`` are the micro-conditions (``framework/core/micro_conditions.py``): the clip's frame rate
    and the source's size before resize and crop; a sample without ``"original_size"`` was not resized, so its
    original size is its own."""
    return {
        "videos": [s["video"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "ids": [s["id"] for s in samples],
        "fps": [float(s["fps"]) for s in samples],
        "original_sizes": [tuple(int(v) for v in s.get("original_size") or s["video"].shape[-2:]) for s in samples],
    }


def collate_manifest(samples: list[dict]) -> dict:
    """``collate_videos``' format plus ``"skipped"``: files that failed while this batch was decoded (and were
    replaced by other samples of the same bucket), for ``SkippedSamplesReport``."""
    batch = collate_videos(samples)
    batch["skipped"] = [s for sample in samples for s in sample.get("skipped", ())]
    return batch


class GenerationDataModule(L.LightningDataModule):
    """Base for data modules: serves ``predict`` from ``prompts``."""

    def __init__(self, prompts: Prompts | None = None) -> None:
        super().__init__()
        self.prompts = prompts if prompts is not None else Prompts()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(PromptDataset(load_prompt_requests(self.prompts)), batch_size=1, collate_fn=collate_prompts)


class SyntheticVideoDataModule(GenerationDataModule):
    """The embedded default: coloured shapes moving in named directions, several sizes, aspect ratios and lengths.

    Batches hold one shape each (``batch_size`` samples); set ``tokens_per_batch`` to pack mixed shapes instead.
    ``frame_rates`` gives samples several frame rates at the same speed in pixels per second (``speed`` is pixels
    per frame at ``fps``), for the fps micro-condition.
    """

    # The dataset's arguments first (passed on to SyntheticMovingShapes), then batching and prompts.
    def __init__(self, num_samples: int = 2048,
                 sizes: Sequence[tuple[int, int, int]] = ((8, 16, 16), (8, 16, 24), (8, 24, 16), (4, 16, 16)),
                 object_size: int = 5, speed: int = 1, seed: int = 0, fps: float = 8.0,
                 batch_size: int = 16, num_workers: int = 0, prompts: Prompts | None = None,
                 tokens_per_batch: int | None = None, geometry: TokenGeometry | None = None,
                 frame_rates: Sequence[float] | None = None) -> None:
        super().__init__(prompts)
        self.dataset = SyntheticMovingShapes(num_samples, [tuple(s) for s in sizes], object_size, speed, seed, fps,
                                             frame_rates)
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.tokens_per_batch, self.geometry = tokens_per_batch, geometry or TokenGeometry()

    def batch_sampler(self) -> ShapeBucketBatchSampler | TokenBudgetBatchSampler:
        """One shape per batch of ``batch_size`` (buckets), or, with ``tokens_per_batch`` set, mixed shapes packed up
        to that many tokens (``geometry`` must match the model's compressor factors and patch size)."""
        shapes = [self.dataset.shape_of(i) for i in range(len(self.dataset))]
        if self.tokens_per_batch is None:
            return ShapeBucketBatchSampler(shapes, self.batch_size, seed=self.seed)
        tokens = [self.geometry.tokens(Bucket(*shape)) for shape in shapes]
        return TokenBudgetBatchSampler(tokens, self.tokens_per_batch, seed=self.seed, max_batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        # its mid-epoch position is saved in checkpoints (exact resume)
        return resumable_loader(self.dataset, self.batch_sampler(), collate_videos, self.num_workers)


class Batching(str, enum.Enum):
    """How a manifest's samples form batches (see ``framework/data/buckets.py``)."""

    BUCKETS = "buckets"  # one bucket per batch, batch size from the token budget: dense attention
    PACKED = "packed"  # mixed buckets packed up to the token budget: block-diagonal attention over a packed sequence


class ManifestVideoDataModule(GenerationDataModule):
    """Trains on a CSV / JSONL manifest of videos and images at their native sizes (``framework/data/manifest.py``).

    Every sample goes to its nearest bucket of ``buckets``; batches hold one bucket each (``batching: buckets``, batch
    size = ``tokens_per_batch`` / the bucket's token count) or mixed buckets packed up to ``tokens_per_batch`` tokens
    (``batching: packed``). ``geometry`` must match the model's compressor factors and patch size. Under DDP set
    ``trainer.use_distributed_sampler=false``: the batch samplers give each rank distinct batches themselves.
    Skipped files are reported at every epoch end by ``SkippedSamplesReport`` (added to the trainer if missing).
    ``manifest`` is needed to train; ``predict`` only generates ``prompts`` and runs without one.
    """

    def __init__(
        self,
        manifest: Path | None = None,  # required to train; predict only needs the prompts
        buckets: BucketConfig | None = None,
        geometry: TokenGeometry | None = None,
        tokens_per_batch: int = 4096,
        max_batch_size: int | None = None,
        batching: Batching = Batching.BUCKETS,
        clip: ClipSampling | None = None,
        drop_last: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        prompts: Prompts | None = None,
    ) -> None:
        super().__init__(prompts)
        if tokens_per_batch < 1:
            raise ValueError(f"ManifestVideoDataModule: tokens_per_batch must be >= 1, got {tokens_per_batch}")
        self.manifest = Path(manifest) if manifest is not None else None
        self.grid = BucketGrid(buckets or BucketConfig())
        self.geometry = geometry or TokenGeometry()
        self.bucket_tokens = {b: self.geometry.tokens(b) for b in self.grid.buckets}  # validates every bucket size
        self.tokens_per_batch, self.max_batch_size, self.batching = tokens_per_batch, max_batch_size, batching
        self.clip = clip or ClipSampling()
        self.drop_last, self.seed, self.num_workers = drop_last, seed, num_workers
        self._dataset: ManifestVideoDataset | None = None

    @property
    def dataset(self) -> ManifestVideoDataset:
        """Built on first use (probing files without metadata), not when a config is parsed."""
        if self._dataset is None:
            if self.manifest is None:
                raise UsageError("ManifestVideoDataModule: no manifest given; training needs one: "
                                 "--data.init_args.manifest=PATH (make it with `kinetoscope scan DIR -o DIR/manifest.csv`)")
            bad_rows = SkippedSamples()  # rows that cannot be parsed are skipped and reported like bad files
            self._dataset = ManifestVideoDataset(read_manifest(self.manifest, bad_rows), self.grid, self.clip)
            self._dataset.skipped.entries.update(bad_rows.entries)
            if not len(self._dataset):
                raise ValueError(f"manifest {self.manifest}: no usable samples\n"
                                 + self._dataset.skipped.report("left out"))
        return self._dataset

    @property
    def skipped_samples(self) -> SkippedSamples:
        """Files left out when the dataset was built (missing, unreadable, no fitting bucket)."""
        return self.dataset.skipped

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.trainer is None:
            return
        self.dataset  # noqa: B018  (build now, so bad manifests fail before training starts)
        message = empty_captions_message(f"manifest {self.manifest}", [s.row.captions for s in self.dataset.samples])
        if message:
            log.warning(message)
        if not any(isinstance(cb, SkippedSamplesReport) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(SkippedSamplesReport())

    def batch_sampler(self, rank: int | None = None, world_size: int | None = None):
        """The training batch sampler; rank and world size default to the trainer's."""
        if self.trainer is not None:
            if self.trainer.world_size > 1 and self.trainer._accelerator_connector.use_distributed_sampler:
                raise ValueError("ManifestVideoDataModule shards batches across ranks itself: "
                                 "set trainer.use_distributed_sampler=false")
            rank = self.trainer.global_rank if rank is None else rank
            world_size = self.trainer.world_size if world_size is None else world_size
        buckets = self.dataset.buckets
        if self.batching is Batching.PACKED:
            return TokenBudgetBatchSampler(
                [self.bucket_tokens[b] for b in buckets], self.tokens_per_batch, seed=self.seed,
                drop_last=self.drop_last, rank=rank, world_size=world_size, max_batch_size=self.max_batch_size,
            )
        sizes = token_budget_batch_sizes(self.grid.buckets, self.geometry, self.tokens_per_batch, self.max_batch_size)
        return ShapeBucketBatchSampler(
            buckets, sizes, seed=self.seed, drop_last=self.drop_last, rank=rank, world_size=world_size
        )

    def train_dataloader(self) -> DataLoader:
        # its mid-epoch position, workers' included, is saved in checkpoints (exact resume); workers decode video:
        # never fork them from a process whose decoder threads they cannot inherit
        return resumable_loader(self.dataset, self.batch_sampler(), collate_manifest, self.num_workers,
                                decoding_worker_context() if self.num_workers > 0 else None)
