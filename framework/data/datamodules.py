"""Lightning data modules. Training batches are dicts of lists, because samples may differ in size."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from torch.utils.data import DataLoader

from framework.data.buckets import ShapeBucketBatchSampler
from framework.data.prompts import PromptDataset, Prompts, collate_prompts, load_prompt_requests
from framework.data.synthetic import SyntheticMovingShapes


def collate_videos(samples: list[dict]) -> dict:
    """-> {"videos": list of [C, T, H, W], "captions": list[str], "ids": list[str], "fps": list[float]}."""
    return {
        "videos": [s["video"] for s in samples],
        "captions": [s["caption"] for s in samples],
        "ids": [s["id"] for s in samples],
        "fps": [float(s["fps"]) for s in samples],
    }


class GenerationDataModule(L.LightningDataModule):
    """Base for data modules: serves ``predict`` from ``prompts``."""

    def __init__(self, prompts: Prompts | None = None) -> None:
        super().__init__()
        self.prompts = prompts if prompts is not None else Prompts()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(PromptDataset(load_prompt_requests(self.prompts)), batch_size=1, collate_fn=collate_prompts)


class SyntheticVideoDataModule(GenerationDataModule):
    """The embedded default: coloured shapes moving in named directions, several sizes, aspect ratios and lengths."""

    def __init__(
        self,
        num_samples: int = 2048,
        sizes: Sequence[tuple[int, int, int]] = ((8, 16, 16), (8, 16, 24), (8, 24, 16), (4, 16, 16)),
        object_size: int = 5,
        speed: int = 1,
        seed: int = 0,
        fps: float = 8.0,
        batch_size: int = 16,
        num_workers: int = 0,
        prompts: Prompts | None = None,
    ) -> None:
        super().__init__(prompts)
        self.dataset = SyntheticMovingShapes(num_samples, [tuple(s) for s in sizes], object_size, speed, seed, fps)
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        shapes = [self.dataset.shape_of(i) for i in range(len(self.dataset))]
        return DataLoader(
            self.dataset,
            batch_sampler=ShapeBucketBatchSampler(shapes, self.batch_size, seed=self.seed),
            collate_fn=collate_videos,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
