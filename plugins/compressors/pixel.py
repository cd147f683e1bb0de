"""Pixel-space "compressor": the latent is the video itself.

The simplest valid Compressor, so a diffusion model can be trained end to end before a learned VAE exists, and a
baseline every learned compressor must beat on generation quality per FLOP.
"""

from __future__ import annotations

from torch import Tensor

from framework.core.interfaces import Compressor


class PixelCompressor(Compressor):
    """Identity compressor: diffusion runs directly on RGB pixels in [-1, 1]."""

    temporal_factor = 1
    spatial_factor = 1
    causal = False

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"PixelCompressor: channels must be >= 1, got {channels}")
        self.latent_channels = channels

    def encode(self, video: Tensor) -> Tensor:
        if video.dim() != 5 or video.shape[1] != self.latent_channels:
            raise ValueError(
                f"PixelCompressor.encode expects [B, {self.latent_channels}, T, H, W], got {tuple(video.shape)}"
            )
        return video  # [B, C, T, H, W]

    def decode(self, latent: Tensor) -> Tensor:
        return latent.clamp(-1.0, 1.0)  # [B, C, T, H, W]
