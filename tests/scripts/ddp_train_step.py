"""Run by tests/test_ddp.py: two training steps of a tiny VideoDiffusion under Lightning's DDP strategy on 2 CPU
processes (gloo). Lightning starts rank 1 by running this script again; each rank writes its final trained weights
the EMACallback average and the captions it trained on to ``OUT_DIR/rank{r}.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from framework.training.ema import EMACallback
from framework.data.datamodules import SyntheticVideoDataModule
from framework.modules import VideoDiffusion
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.st_dit import STDiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow


class CaptionRecorder(L.Callback):
    def __init__(self) -> None:
        self.captions: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.captions.extend(batch["captions"])


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(patch_t=1, patch_h=4, patch_w=4),
        STDiT(width=32, depth=2, num_heads=2), HashedTextConditioner(width=16, depth=1, num_heads=2),
        RectifiedFlow(), learning_rate=1e-2,
    )
    initial = {k: v.detach().clone() for k, v in model.trained_modules().state_dict().items()}
    data = SyntheticVideoDataModule(num_samples=32, sizes=((4, 8, 8),), batch_size=4, seed=0)
    recorder, ema = CaptionRecorder(), EMACallback(decay=0.5)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False, enable_checkpointing=False,
        use_distributed_sampler=False,  # ShapeBucketBatchSampler shards batches across ranks itself
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir, callbacks=[recorder, ema],
    )
    trainer.fit(model, data)
    weights = {k: v.detach().cpu() for k, v in model.trained_modules().state_dict().items()}
    torch.save({"initial": initial, "weights": weights, "captions": recorder.captions,
                "ema": {k: v.cpu() for k, v in ema.average.items()},
                "world_size": trainer.world_size}, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
