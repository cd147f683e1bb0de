"""Ablation for benchmarks/reliability.py: the synthetic data module with a plain DataLoader (no saved position)."""

from torch.utils.data import DataLoader

from framework.data.datamodules import SyntheticVideoDataModule, collate_videos


class PlainLoaderSyntheticDataModule(SyntheticVideoDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_sampler=self.batch_sampler(), collate_fn=collate_videos)
