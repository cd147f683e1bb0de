"""CompressorTraining: trains a variational compressor (e.g. ``CausalVAE``) with ``kinetoscope fit``.

Loss, as in the KL-regularised autoencoders of latent diffusion (Rombach et al., 2022; Esser et al., "Taming
Transformers", 2021)::

    l1_weight * L1(x, D(z)) + mse_weight * MSE(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I))
        [+ adversarial_weight * hinge GAN loss of a 3D PatchGAN]

L1 keeps edges sharp; the MSE term optimises PSNR directly (PSNR is a function of the MSE). The learning rate rises
linearly over ``warmup_steps`` optimizer steps (Goyal et al., "Accurate, Large Minibatch SGD", 2017), which lets a
small network use a high rate (1e-3 and more) without early divergence.

The adversarial term (optional, ``adversarial: true``) uses a small 3D PatchGAN discriminator (Isola et al.,
"Image-to-Image Translation with Conditional Adversarial Networks", 2017, with 3D convolutions) and hinge losses; it
switches on after ``adversarial_start_step`` steps, once reconstructions are roughly right, as LDM does.

With ``ema_decay`` > 0 an exponential moving average of the compressor's weights is kept (Polyak averaging; on
a shared CPU's few thousand noisy steps it is steadier than the last step's weights) and the compressor takes the
averaged weights at the end of ``fit``.

At the end of ``fit`` the compressor's latent statistics are measured on the training data and, with
``export_path``, weights plus statistics are written as one ``.safetensors`` file that a diffusion config loads
(``CausalVAE(checkpoint=...)``).
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from framework.layers.variational import VariationalCompressor
from framework.data.video_io import write_frame_grid


def psnr(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB for videos in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = (reconstruction.clamp(-1, 1) - target).square().mean()
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: strided 3D convolutions that halve space (time kept) -> one real/fake logit per patch."""

    def __init__(self, channels: int = 32, layers: int = 3) -> None:
        super().__init__()
        if channels < 1 or layers < 1:
            raise ValueError(f"PatchDiscriminator3D: channels and layers must be >= 1, got {channels}, {layers}")
        blocks: list[nn.Module] = []
        c_in = 3
        for i in range(layers):
            c_out = channels * min(2**i, 8)
            blocks += [nn.Conv3d(c_in, c_out, (3, 4, 4), stride=(1, 2, 2), padding=1)]
            if i > 0:
                blocks += [nn.GroupNorm(min(32, c_out // 4) or 1, c_out)]
            blocks += [nn.LeakyReLU(0.2)]
            c_in = c_out
        blocks += [nn.Conv3d(c_in, 1, 3, padding=1)]
        self.net = nn.Sequential(*blocks)
        self.min_size = 2**layers

    def forward(self, video: Tensor) -> Tensor:
        if min(video.shape[-2:]) < self.min_size:
            raise ValueError(
                f"PatchDiscriminator3D: height and width must be >= {self.min_size}, got {tuple(video.shape[-2:])}"
            )
        return self.net(video)  # [B, 1, T, H / 2^layers, W / 2^layers]


class CompressorTraining(L.LightningModule):
    """Trains a VariationalCompressor on reconstruction (L1) + KL, optionally + an adversarial loss."""

    def __init__(
        self,
        compressor: VariationalCompressor,
        learning_rate: float = 2e-4,
        warmup_steps: int = 0,
        l1_weight: float = 1.0,
        mse_weight: float = 0.0,
        kl_weight: float = 1e-6,
        sample_posterior: bool = True,
        adversarial: bool = False,
        adversarial_weight: float = 0.1,
        adversarial_start_step: int = 0,
        discriminator_channels: int = 32,
        discriminator_layers: int = 3,
        gradient_clip_val: float | None = 1.0,
        ema_decay: float = 0.0,
        log_reconstructions_every_n_steps: int = 200,
        statistics_batches: int = 16,
        export_path: str | None = None,
    ) -> None:
        """``sample_posterior`` decodes a sample of q(z|x) (the VAE objective) instead of its mean;
        ``log_reconstructions_every_n_steps`` writes input-above-reconstruction PNG strips to
        ``<log dir>/reconstructions`` (0 turns it off); ``ema_decay`` > 0 averages the weights over generator steps
        and hands the average to the compressor at the end of fit; ``statistics_batches`` bounds the data used for the latent
        statistics measured at the end of fit; ``export_path`` then writes the compressor as ``.safetensors``."""
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"CompressorTraining: learning_rate must be > 0, got {learning_rate}")
        for name, value in (("warmup_steps", warmup_steps), ("l1_weight", l1_weight), ("mse_weight", mse_weight),
                            ("kl_weight", kl_weight), ("adversarial_weight", adversarial_weight),
                            ("adversarial_start_step", adversarial_start_step),
                            ("log_reconstructions_every_n_steps", log_reconstructions_every_n_steps)):
            if value < 0:
                raise ValueError(f"CompressorTraining: {name} must be >= 0, got {value}")
        if l1_weight == 0 and mse_weight == 0:
            raise ValueError("CompressorTraining: l1_weight and mse_weight are both 0; there is no reconstruction loss")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"CompressorTraining: ema_decay must be in [0, 1), got {ema_decay}")
        if statistics_batches < 1:
            raise ValueError(f"CompressorTraining: statistics_batches must be >= 1, got {statistics_batches}")
        # As in VideoDiffusion: under LightningCLI the compressor is saved as its class_path config.
        built_by_cli = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=None if built_by_cli else ["compressor"])
        self.compressor = compressor
        self.compressor_ema = (
            AveragedModel(compressor, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
            if ema_decay > 0 else None
        )
        self.discriminator = PatchDiscriminator3D(discriminator_channels, discriminator_layers) if adversarial else None
        # Two optimizers (generator, discriminator) step separately, so optimisation is manual.
        self.automatic_optimization = False

    # ------------------------------------------------------------------------------------------------ training
    @staticmethod
    def stack_videos(batch: dict | Tensor) -> Tensor:
        """A batch's videos as one ``[B, 3, T, H, W]`` tensor (the data modules bucket equal sizes together)."""
        videos = batch["videos"] if isinstance(batch, dict) else batch
        if isinstance(videos, Tensor):
            return videos
        shapes = {tuple(v.shape) for v in videos}
        if len(shapes) != 1:
            raise ValueError(f"CompressorTraining: a batch mixes video sizes {sorted(shapes)}; bucket by size")
        return torch.stack(list(videos))  # [B, 3, T, H, W]

    def adversarial_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.hparams.adversarial_start_step

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        videos = self.stack_videos(batch)  # [B, 3, T, H, W]
        optimizers = self.optimizers()
        opt_g, opt_d = optimizers if isinstance(optimizers, list) else (optimizers, None)
        adversarial = self.adversarial_active()

        posterior = self.compressor.posterior(videos)  # over [B, c, t, h, w]
        z = posterior.sample() if hp.sample_posterior else posterior.mean  # [B, c, t, h, w]
        reconstruction = self.compressor.decode_latent(z)  # [B, 3, T, H, W]
        l1 = (reconstruction - videos).abs().mean()
        mse = (reconstruction - videos).square().mean()
        kl = posterior.kl().mean()
        loss = hp.l1_weight * l1 + hp.mse_weight * mse + hp.kl_weight * kl
        if adversarial:
            self.discriminator.requires_grad_(False)  # the generator step must not move the discriminator
            generator_adv = -self.discriminator(reconstruction).mean()
            self.discriminator.requires_grad_(True)
            loss = loss + hp.adversarial_weight * generator_adv
            self.log("train/generator_adversarial", generator_adv, batch_size=len(videos))
        self.apply_warmup(opt_g, opt_d)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if hp.gradient_clip_val:
            self.clip_gradients(opt_g, gradient_clip_val=hp.gradient_clip_val, gradient_clip_algorithm="norm")
        opt_g.step()
        if self.compressor_ema is not None:
            self.compressor_ema.update_parameters(self.compressor)

        if adversarial:
            real, fake = self.discriminator(videos), self.discriminator(reconstruction.detach())  # patch logits
            discriminator_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # hinge loss
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(discriminator_loss)
            opt_d.step()
            self.log("train/discriminator", discriminator_loss, batch_size=len(videos))

        size = len(videos)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/l1", l1, batch_size=size)
        self.log("train/mse", mse, batch_size=size)
        self.log("train/kl", kl, batch_size=size)
        self.log("train/psnr", psnr(reconstruction.detach(), videos), prog_bar=True, batch_size=size)
        every = hp.log_reconstructions_every_n_steps
        if every and batch_idx % every == 0:
            self.write_reconstruction(videos[0], reconstruction[0].detach())
        return loss.detach()

    def apply_warmup(self, *optimizers) -> None:
        """Set every optimizer's rate to ``learning_rate * min(1, (step + 1) / warmup_steps)``."""
        scale = min(1.0, (self.global_step + 1) / self.hparams.warmup_steps) if self.hparams.warmup_steps else 1.0
        for optimizer in optimizers:
            if optimizer is not None:
                for group in optimizer.param_groups:
                    group["lr"] = self.hparams.learning_rate * scale

    def configure_optimizers(self):
        lr = self.hparams.learning_rate
        generator = torch.optim.AdamW(self.compressor.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)
        if self.discriminator is None:
            return generator
        return [generator, torch.optim.AdamW(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))]

    # ----------------------------------------------------------------------------------------------- outputs
    def reconstruction_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "reconstructions"

    def write_reconstruction(self, video: Tensor, reconstruction: Tensor) -> Path:
        """Input frames above their reconstruction, as one PNG strip named by the global step."""
        strip = torch.cat([video, reconstruction.clamp(-1, 1)], dim=2).float().cpu()  # [3, T, 2H, W]
        upscale = max(1, math.ceil(64 / video.shape[-1]))
        return write_frame_grid(self.reconstruction_dir() / f"step_{self.global_step:07d}.png", strip, upscale)

    def on_fit_end(self) -> None:
        """Load the averaged weights (with ``ema_decay``), measure the latent statistics on the training data, then
        export weights + statistics if asked."""
        if self.compressor_ema is not None:
            self.compressor.load_state_dict(self.compressor_ema.module.state_dict())
        loader = self.trainer.train_dataloader
        if loader is None:
            return
        batches = 1 if self.trainer.fast_dev_run else self.hparams.statistics_batches
        was_training = self.compressor.training
        self.compressor.eval()
        self.compressor.fit_latent_statistics(loader, max_batches=batches)
        self.compressor.train(was_training)
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.compressor.save_weights(self.hparams.export_path)
