"""Run by tests/test_fsdp.py: two training steps of a tiny VideoDiffusion under Lightning's ModelParallelStrategy
with FSDP2 sharding (``VideoDiffusion.configure_model``: parameters, gradients and optimizer state sharded over 2 CPU
processes, gloo). Lightning starts rank 1 by running this script
again. Each rank writes to ``OUT_DIR/rank{r}.pt`` the batches it trained on, the random-number state at the start
of each step (so a single process can replay the step exactly) and the gathered full weights after training.
The test imports ``build_model`` and ``single_process_steps`` from here for the single-process reference."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from framework.data.datamodules import SyntheticVideoDataModule
from framework.modules import VideoDiffusion
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow

LEARNING_RATE = 1e-2


def build_model() -> VideoDiffusion:
    torch.manual_seed(0)
    model = VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(patch_t=1, patch_h=4, patch_w=4),
        DiT(width=32, depth=2, num_heads=2), HashedTextConditioner(width=16, depth=1, num_heads=2, caption_dropout=0.0),
        RectifiedFlow(), learning_rate=LEARNING_RATE, cosine_decay=False,  # constant rate: easy to replay
    )
    for p in model.denoiser.parameters():  # off the adaLN-Zero init, so every weight gets a gradient from step one
        torch.nn.init.normal_(p, std=0.05)
    return model


def single_process_steps(model: VideoDiffusion, steps: list[list[tuple[dict, torch.Tensor]]]) -> None:
    """Replay data-parallel training in one process: per step, each rank's (batch, RNG state); gradients averaged
    over the ranks as FSDP's reduce-scatter does, then the module's AdamW settings (weight decay 0 by default)."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, betas=(0.9, 0.99), weight_decay=0.0
    )
    for per_rank in steps:
        optimizer.zero_grad()
        for batch, rng_state in per_rank:
            torch.set_rng_state(rng_state)
            (model.training_step(batch, 0) / len(per_rank)).backward()
        optimizer.step()


class BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.steps: list[tuple[dict, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(({"videos": [v.cpu() for v in batch["videos"]], "captions": list(batch["captions"])},
                           torch.get_rng_state()))


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = build_model()
    data = SyntheticVideoDataModule(num_samples=32, sizes=((4, 8, 8), (2, 8, 12)), batch_size=4, seed=0)
    recorder = BatchRecorder()
    # FSDP2 (VideoDiffusion.configure_model shards each block with fully_shard): all 2 processes shard one model
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=2, logger=False, enable_checkpointing=False,
        use_distributed_sampler=False,  # ShapeBucketBatchSampler shards batches across ranks itself
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out_dir, callbacks=[recorder],
    )
    trainer.fit(model, data)
    # every rank holds a shard of each trained weight; full_tensor() all-gathers one (collective, same order on all)
    state = model.trained_modules().state_dict()
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}
    params = list(model.trained_modules().parameters())
    torch.save({"steps": recorder.steps, "weights": full, "world_size": trainer.world_size,
                "sharded": all(isinstance(p, DTensor) for p in params),
                "local_numel": sum(p.to_local().numel() for p in params if isinstance(p, DTensor)),
                "total_numel": sum(p.numel() for p in params)}, out_dir / f"rank{trainer.global_rank}.pt")

if __name__ == "__main__":
    main(Path(sys.argv[1]))
