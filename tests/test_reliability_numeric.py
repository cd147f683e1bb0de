"""Numeric faults: a NaN/Inf loss or gradient is caught before the weights change, the step is skipped or the run
stops as configured (naming the batch's sample ids), and a NaN checkpoint never replaces a good one."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from framework.training.checkpointing import NonFiniteCheckpointError, SafeCheckpointIO, load_checkpoint_safely
from framework.data.datamodules import SyntheticVideoDataModule
from framework.modules import VideoDiffusion
from framework.training.reliability import NonFiniteAction, NonFiniteError, NonFiniteGuard
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow


def tiny_model() -> VideoDiffusion:
    return VideoDiffusion(PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
                          HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow())


class NaNPixels(L.Callback):
    """Fault injection: the batch of step ``at_step`` gets NaN pixels in its first video."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.ids = at_step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            batch["videos"][0] = torch.full_like(batch["videos"][0], float("nan"))
            self.ids = list(batch["ids"])


class PoisonGradient(L.Callback):
    """Fault injection: after backward of step ``at_step``, one gradient entry becomes +Inf."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.ids = at_step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._ids = list(batch["ids"])

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.at_step:
            next(p for p in pl_module.denoiser.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
            self.ids = self._ids


class PoisonWeights(L.Callback):
    """Fault injection that bypasses every guard: a weight becomes NaN right before the step's checkpoint."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                next(pl_module.denoiser.parameters()).view(-1)[0] = float("nan")


class WeightRecorder(L.Callback):
    """Trained weights after each step (global step -> flat copy)."""

    def __init__(self) -> None:
        self.after: dict[int, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flat = torch.cat([p.detach().flatten() for p in pl_module.trained_modules().parameters()])
        self.after[trainer.global_step] = flat.clone()


def fit(tmp_path: Path, callbacks: list[L.Callback], max_steps: int) -> tuple[L.Trainer, Path]:
    torch.manual_seed(0)
    folder = tmp_path / "checkpoints"
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, plugins=[SafeCheckpointIO()],
        callbacks=[*callbacks, ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True, save_top_k=-1)],
    )
    trainer.fit(tiny_model(), SyntheticVideoDataModule(num_samples=16, sizes=[(4, 16, 16)], batch_size=4))
    return trainer, folder


def all_finite(state_dict: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state_dict.values() if v.is_floating_point())


def test_skip_drops_the_update_of_a_batch_with_nan_pixels_and_names_its_samples(tmp_path: Path) -> None:
    guard, fault, weights = NonFiniteGuard(NonFiniteAction.SKIP), NaNPixels(at_step=2), WeightRecorder()
    trainer, folder = fit(tmp_path, [fault, guard, weights], max_steps=5)
    assert trainer.global_step == 5  # the run went on
    assert [(e.step, e.what) for e in guard.events] == [(3, "loss")]
    assert guard.events[0].ids == fault.ids and len(fault.ids) == 4
    assert torch.equal(weights.after[3], weights.after[2])  # the poisoned step changed nothing
    assert not torch.equal(weights.after[4], weights.after[3])  # later steps train again
    assert all(bool(torch.isfinite(w).all()) for w in weights.after.values())
    last = load_checkpoint_safely(folder / "last.ckpt")
    assert last["global_step"] == 5 and all_finite(last["state_dict"])
    assert last["callbacks"]["NonFiniteGuard"]["events"] == [(3, "loss", fault.ids)]


def test_stop_ends_the_run_on_an_inf_gradient_naming_the_samples(tmp_path: Path) -> None:
    fault = PoisonGradient(at_step=2)
    with pytest.raises(NonFiniteError, match=r"stopped the run: step 3: non-finite gradient of 1 parameters") as info:
        fit(tmp_path, [fault, NonFiniteGuard(NonFiniteAction.STOP)], max_steps=5)
    assert all(sample_id in str(info.value) for sample_id in fault.ids)
    last = load_checkpoint_safely(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and all_finite(last["state_dict"])  # the step-2 state, written before the fault


def test_too_many_skips_in_a_row_stop_the_run(tmp_path: Path) -> None:
    class AlwaysNaN(NaNPixels):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.at_step = trainer.global_step
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        fit(tmp_path, [AlwaysNaN(0), NonFiniteGuard(NonFiniteAction.SKIP, max_consecutive_skips=2)], max_steps=6)


def test_nan_weights_never_overwrite_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteCheckpointError, match=r"refusing to write checkpoint .*step=3.ckpt.*denoiser\."):
        fit(tmp_path, [PoisonWeights(at_step=3)], max_steps=5)
    last = load_checkpoint_safely(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and all_finite(last["state_dict"])
    assert not (tmp_path / "checkpoints" / "epoch=0-step=3.ckpt").exists()
