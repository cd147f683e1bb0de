"""Framewise 2D VAE: a pretrained image autoencoder (a local diffusers ``AutoencoderKL`` directory, e.g. the Stable
Diffusion / SDXL / FLUX VAE) applied to every frame independently.

No temporal compression (``temporal_factor = 1``, any frame count is valid), so it is the image-VAE baseline that
the causal video VAE must beat on tokens per second of video. Nothing is downloaded: the directory must already
hold ``config.json`` and the weights (``AutoencoderKL.save_pretrained`` writes both). Requires the optional extra
``pip install kinetoscope[diffusers]``.

Latent normalisation: the directory's ``scaling_factor`` / ``shift_factor`` (``latent = (z - shift) * scale``)
become the ``latent_mean`` / ``latent_std`` buffers of ``VariationalCompressor``, or, with
``use_config_scaling: false``, the identity until ``fit_latent_statistics`` measures them on your data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from framework.layers.variational import DiagonalGaussian, VariationalCompressor
from plugins.diffusers_folders import component_folder, load_diffusers_model


def _load_autoencoder_kl(path: Path):
    owner = "FramewiseDiffusersVAE"
    folder = component_folder(path)
    return load_diffusers_model(folder, ("AutoencoderKL",), owner)[0]


class FramewiseDiffusersVAE(VariationalCompressor):
    """Per-frame 2D KL-VAE loaded from a local diffusers ``AutoencoderKL`` directory (no temporal compression)."""

    temporal_factor = 1
    causal = False

    def __init__(self, path: str, frames_per_batch: int = 16, use_config_scaling: bool = True) -> None:
        """``frames_per_batch`` bounds how many frames go through the 2D VAE at once in ``encode`` / ``decode``."""
        if frames_per_batch < 1:
            raise ValueError(f"FramewiseDiffusersVAE: frames_per_batch must be >= 1, got {frames_per_batch}")
        model = _load_autoencoder_kl(Path(path))
        config = model.config
        super().__init__(config.latent_channels)
        self.autoencoder = model.eval()
        self.spatial_factor = 2 ** (len(config.block_out_channels) - 1)
        self.frames_per_batch = frames_per_batch
        if use_config_scaling:
            shift = config.shift_factor or 0.0
            self.latent_mean.fill_(shift)
            self.latent_std.fill_(1.0 / config.scaling_factor)

    @staticmethod
    def _frames(x: Tensor) -> Tensor:
        return x.transpose(1, 2).flatten(0, 1)  # [B, C, T, H, W] -> [B*T, C, H, W]

    @staticmethod
    def _video(frames: Tensor, batch: int) -> Tensor:
        return frames.unflatten(0, (batch, -1)).transpose(1, 2)  # [B*T, C, H, W] -> [B, C, T, H, W]

    def posterior(self, video: Tensor) -> DiagonalGaussian:
        self.check_video(video)
        dist = self.autoencoder.encode(self._frames(video)).latent_dist  # over [B*T, c, h, w]
        return DiagonalGaussian(self._video(dist.mean, len(video)), self._video(dist.logvar, len(video)))

    def decode_latent(self, z: Tensor) -> Tensor:
        self.check_latent(z)
        return self._video(self.autoencoder.decode(self._frames(z)).sample, len(z))  # [B, 3, T, H, W]

    @torch.no_grad()
    def encode_raw(self, video: Tensor) -> Tensor:
        frames = self._frames(video)  # [B*T, 3, H, W]
        means = [self.autoencoder.encode(chunk).latent_dist.mean for chunk in frames.split(self.frames_per_batch)]
        return self._video(torch.cat(means), len(video))  # [B, c, T, h, w]

    @torch.no_grad()
    def decode_raw(self, z: Tensor) -> Tensor:
        frames = self._frames(z)  # [B*T, c, h, w]
        pixels = [self.autoencoder.decode(chunk).sample for chunk in frames.split(self.frames_per_batch)]
        return self._video(torch.cat(pixels), len(z))  # [B, 3, T, H, W]
