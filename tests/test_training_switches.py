"""Training switches of VideoDiffusion under a real Lightning Trainer: the fused AdamW kernel and bf16 autocast."""

from __future__ import annotations

import lightning as L
import torch

from framework.data.datamodules import SyntheticVideoDataModule
from framework.modules import VideoDiffusion
from plugins.compressors.pixel import PixelCompressor
from plugins.conditioners.hashed_text import HashedTextConditioner
from plugins.denoisers.dit import DiT
from plugins.patchers.spacetime import SpacetimePatcher
from plugins.samplers.rectified_flow import RectifiedFlow


def tiny_model(**options) -> VideoDiffusion:
    torch.manual_seed(0)
    return VideoDiffusion(
        PixelCompressor(), SpacetimePatcher(1, 4, 4), DiT(width=32, depth=1, num_heads=2),
        HashedTextConditioner(width=16, depth=1, num_heads=2), RectifiedFlow(), learning_rate=1e-2, **options,
    )


class RecordLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


def fit(model: VideoDiffusion, steps: int, precision: str = "32-true") -> RecordLosses:
    L.seed_everything(0)
    recorder = RecordLosses()
    data = SyntheticVideoDataModule(num_samples=8, sizes=((4, 8, 8), (2, 8, 16)), batch_size=4, seed=0)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
    )
    trainer.fit(model, data)
    return recorder


def test_fused_adamw_is_selected_and_takes_the_same_step_as_the_default() -> None:
    default, fused = tiny_model(), tiny_model(fused_optimizer=True)
    fit(default, steps=2)
    fit(fused, steps=2)
    assert fused.trainer.optimizers[0].defaults["fused"] is True
    assert not default.trainer.optimizers[0].defaults["fused"]
    changed = 0
    for (name, weight), reference in zip(fused.trained_modules().named_parameters(),
                                         default.trained_modules().parameters()):
        torch.testing.assert_close(weight, reference, rtol=1e-5, atol=1e-6, msg=f"fused AdamW differs in {name}")
        changed += not torch.equal(weight, tiny_model().trained_modules().get_parameter(name))
    assert changed > 0  # the steps really trained


def test_bf16_mixed_precision_runs_the_denoiser_in_bfloat16_and_the_loss_is_finite() -> None:
    model = tiny_model()
    dtypes: list[torch.dtype] = []
    model.denoiser.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    recorder = fit(model, steps=2, precision="bf16-mixed")
    assert len(recorder.losses) == 2
    assert all(torch.isfinite(loss) for loss in recorder.losses)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # autocast really ran the linear layers in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32 ("mixed")
