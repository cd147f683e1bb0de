"""CompressorTraining: training steps run on CPU and lower the loss, the adversarial switch trains a discriminator,
reconstructions are written, and fit ends with measured latent statistics in an exported weights file."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from framework.data.datamodules import SyntheticVideoDataModule
from framework.modules.compressor_training import CompressorTraining, PatchDiscriminator3D, psnr
from plugins.compressors.causal_vae import CausalVAE, VAESize


def tiny_vae(**kwargs) -> CausalVAE:
    torch.manual_seed(0)
    return CausalVAE(latent_channels=4, size=VAESize.TINY, base_channels=8, tiling=None, **kwargs)


def data(batch_size: int = 4) -> SyntheticVideoDataModule:
    return SyntheticVideoDataModule(num_samples=16, sizes=[(5, 16, 16), (1, 16, 16)], object_size=4,
                                    batch_size=batch_size)


def fit(module: CompressorTraining, root, steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, datamodule=data())
    return trainer


def test_training_lowers_the_reconstruction_loss_on_a_fixed_batch() -> None:
    module = CompressorTraining(tiny_vae(), learning_rate=3e-4, sample_posterior=False)
    batch = next(iter(data().train_dataloader()))
    videos = CompressorTraining.stack_videos(batch)
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(20):
        posterior = module.compressor.posterior(videos)
        loss = (module.compressor.decode_latent(posterior.mean) - videos).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]


def test_fit_runs_writes_reconstructions_and_exports_statistics(tmp_path) -> None:
    export = tmp_path / "vae.safetensors"
    module = CompressorTraining(tiny_vae(), log_reconstructions_every_n_steps=1, statistics_batches=2,
                                export_path=str(export))
    before = {k: v.clone() for k, v in module.compressor.state_dict().items()}
    trainer = fit(module, tmp_path, steps=2)
    assert trainer.global_step == 2
    metrics = trainer.callback_metrics
    assert all(torch.isfinite(metrics[k]) for k in ("train/loss", "train/l1", "train/kl", "train/psnr"))
    after = module.compressor.state_dict()
    assert not torch.equal(before["encoder.conv_in.conv.weight"], after["encoder.conv_in.conv.weight"])
    assert not torch.equal(before["latent_std"], after["latent_std"])  # measured at the end of fit
    assert sorted(p.name for p in (tmp_path / "reconstructions").glob("*.png")) == [
        "step_0000001.png", "step_0000002.png"
    ]
    loaded = tiny_vae(checkpoint=str(export))
    assert torch.equal(loaded.latent_std, module.compressor.latent_std.cpu())
    assert torch.equal(loaded.encoder.conv_in.conv.weight, after["encoder.conv_in.conv.weight"])


def test_adversarial_switch_trains_the_discriminator_only_after_its_start(tmp_path) -> None:
    module = CompressorTraining(tiny_vae(), adversarial=True, adversarial_start_step=1, discriminator_channels=4,
                                discriminator_layers=2, log_reconstructions_every_n_steps=0)
    before = module.discriminator.net[0].weight.clone()
    trainer = fit(module, tmp_path, steps=3)  # batch 1: generator step; batch 2: generator + discriminator steps
    assert trainer.global_step == 3
    assert "train/discriminator" in trainer.callback_metrics
    assert not torch.equal(before, module.discriminator.net[0].weight)


def test_discriminator_rejects_clips_smaller_than_its_patches() -> None:
    with pytest.raises(ValueError, match="height and width must be >= 8"):
        PatchDiscriminator3D(channels=4, layers=3)(torch.zeros(1, 3, 1, 4, 16))


def test_mixed_sizes_in_one_batch_are_rejected() -> None:
    with pytest.raises(ValueError, match="mixes video sizes"):
        CompressorTraining.stack_videos({"videos": [torch.zeros(3, 1, 8, 8), torch.zeros(3, 5, 8, 8)]})


def test_psnr_matches_its_definition() -> None:
    target = torch.zeros(1, 3, 1, 4, 4)
    assert psnr(target + 0.02, target).item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.0004)).item())


def test_the_loss_weighs_l1_mse_and_kl_as_configured(tmp_path) -> None:
    module = CompressorTraining(tiny_vae(), l1_weight=0.5, mse_weight=2.0, kl_weight=1e-3, sample_posterior=False,
                                log_reconstructions_every_n_steps=0)
    metrics = fit(module, tmp_path, steps=1).callback_metrics
    expected = 0.5 * metrics["train/l1"] + 2.0 * metrics["train/mse"] + 1e-3 * metrics["train/kl"]
    assert metrics["train/loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["train/mse"] > 0


def test_learning_rate_warms_up_linearly_over_the_first_steps(tmp_path) -> None:
    module = CompressorTraining(tiny_vae(), learning_rate=1e-3, warmup_steps=4, log_reconstructions_every_n_steps=0)
    trainer = fit(module, tmp_path, steps=2)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 2 / 4)  # set for the 2nd step
    trainer = fit(CompressorTraining(tiny_vae(), learning_rate=1e-3, warmup_steps=2,
                                     log_reconstructions_every_n_steps=0), tmp_path, steps=3)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # warm-up over


def test_a_loss_without_any_reconstruction_term_is_rejected() -> None:
    with pytest.raises(ValueError, match="l1_weight and mse_weight are both 0"):
        CompressorTraining(tiny_vae(), l1_weight=0.0, mse_weight=0.0)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        CompressorTraining(tiny_vae(), warmup_steps=-1)


def test_ema_averages_the_weights_and_the_compressor_ends_with_the_average(tmp_path) -> None:
    """With ema_decay the average follows ``ema = d * ema + (1 - d) * weights`` after each generator step (the
    first step copies), and the compressor holds the average after fit (then measures its statistics)."""
    module = CompressorTraining(tiny_vae(), learning_rate=1e-2, ema_decay=0.5, log_reconstructions_every_n_steps=0)
    name = "encoder.conv_in.conv.weight"
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(pl_module.compressor.state_dict()[name].clone())

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[Record()])
    trainer.fit(module, datamodule=data())
    expected = seen[0]
    for weights in seen[1:]:
        expected = 0.5 * expected + 0.5 * weights
    final = module.compressor.state_dict()[name]
    assert torch.allclose(final, expected, atol=1e-6)
    assert not torch.allclose(final, seen[-1])  # the last step's weights were replaced by the average
    with pytest.raises(ValueError, match="ema_decay must be in"):
        CompressorTraining(tiny_vae(), ema_decay=1.0)
