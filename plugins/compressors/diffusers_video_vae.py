"""Open-weight diffusers video VAEs (Wan 2.1, LTX-Video, CogVideoX) as a ``Compressor``, from a local folder.

One adapter; the folder's ``config.json`` ``_class_name`` picks the family description (``FAMILIES``):

=========================  ========  =======  ===========  ==========================================================
class                      time      space    frames       latent normalisation (``latent = (z - mean) / std``)
=========================  ========  =======  ===========  ==========================================================
AutoencoderKLWan           4x        8x       1 + 4k       per channel: config ``latents_mean`` / ``latents_std``
AutoencoderKLLTXVideo      8x        32x      1 + 8k       per channel: ``latents_mean``, ``latents_std / scaling_factor``
AutoencoderKLCogVideoX     4x        8x       1 + 4k       ``std = 1 / scaling_factor``, mean 0
=========================  ========  =======  ===========  ==========================================================

(the factors shown are the released models'; the adapter reads them from each folder). All three are causal: the
first frame is its own latent frame, so a single image is a valid video. The normalisation is exactly what the
pipelines apply before their transformer (``WanPipeline``: ``(z - mean) * (1 / std)``; ``LTXPipeline``:
``(z - mean) * scaling_factor / std``; ``CogVideoXPipeline``: ``z * scaling_factor``), held in the
``latent_mean`` / ``latent_std`` buffers of ``VariationalCompressor``, so ``encode`` / ``decode`` speak the
transformer's latent and ``kinetoscope cache-latents`` stores it.

Long and large videos: Wan and CogVideoX decode frame by frame (Wan) or in frame batches (CogVideoX) with causal
caches, so memory does not grow with the clip's length; ``tile_size`` (pixels) turns on diffusers' spatial tiling
(``enable_tiling``, tiles overlapping by a quarter) for large frames, and for LTX also temporal tiling. Tiled
decoding blends tile borders, so it is close to, not equal to, the whole-frame decode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from framework.layers.variational import DiagonalGaussian, VariationalCompressor
from plugins.diffusers_folders import component_folder, load_diffusers_model


@dataclass(frozen=True)
class VAEFamily:
    """How to read one diffusers video VAE: its factors and its latent normalisation (mean [c], std [c])."""

    factors: Callable[[nn.Module], tuple[int, int]]  # (temporal, spatial)
    normalisation: Callable[[nn.Module], tuple[Tensor, Tensor]]
    enable_tiling: Callable[[nn.Module, int], None]


def _wan_normalisation(vae: nn.Module) -> tuple[Tensor, Tensor]:
    return torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)


def _ltx_normalisation(vae: nn.Module) -> tuple[Tensor, Tensor]:
    return vae.latents_mean.detach().clone(), vae.latents_std.detach() / vae.config.scaling_factor


def _cogvideox_normalisation(vae: nn.Module) -> tuple[Tensor, Tensor]:
    c = vae.config.latent_channels
    return torch.zeros(c), torch.full((c,), 1.0 / vae.config.scaling_factor)


def _tile_kwargs(size: int) -> dict:
    stride = max(size * 3 // 4, 1)
    return dict(tile_sample_min_height=size, tile_sample_min_width=size, tile_sample_stride_height=stride,
                tile_sample_stride_width=stride)


FAMILIES: dict[str, VAEFamily] = {
    "AutoencoderKLWan": VAEFamily(
        factors=lambda vae: (int(vae.config.scale_factor_temporal), int(vae.config.scale_factor_spatial)),
        normalisation=_wan_normalisation,
        enable_tiling=lambda vae, size: vae.enable_tiling(**_tile_kwargs(size)),
    ),
    "AutoencoderKLLTXVideo": VAEFamily(
        factors=lambda vae: (int(vae.temporal_compression_ratio), int(vae.spatial_compression_ratio)),
        normalisation=_ltx_normalisation,
        enable_tiling=lambda vae, size: vae.enable_tiling(**_tile_kwargs(size)),
    ),
    "AutoencoderKLCogVideoX": VAEFamily(
        factors=lambda vae: (int(vae.config.temporal_compression_ratio),
                             2 ** (len(vae.config.block_out_channels) - 1)),
        normalisation=_cogvideox_normalisation,
        enable_tiling=lambda vae, size: vae.enable_tiling(tile_sample_min_height=size, tile_sample_min_width=size),
    ),
}


class DiffusersVideoVAE(VariationalCompressor):
    """A local diffusers ``AutoencoderKLWan`` / ``AutoencoderKLLTXVideo`` / ``AutoencoderKLCogVideoX`` (causal,
    with its own latent normalisation)."""

    causal = True

    def __init__(self, path: Path, subfolder: str | None = "vae", tile_size: int | None = None) -> None:
        """``path`` is a pipeline folder and ``subfolder`` its VAE (``null``: ``path`` is the VAE folder itself).
        ``tile_size`` (pixels) decodes and encodes frames larger than it in overlapping tiles."""
        self_name = "DiffusersVideoVAE"
        folder = component_folder(path, subfolder)
        vae, class_name = load_diffusers_model(folder, FAMILIES, self_name)
        super().__init__(int(vae.config.latent_channels if hasattr(vae.config, "latent_channels")
                             else vae.config.z_dim))
        self.folder, self.class_name = folder, class_name
        self.autoencoder = vae.eval()
        family = FAMILIES[class_name]
        self.temporal_factor, self.spatial_factor = family.factors(vae)
        mean, std = family.normalisation(vae)
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(f"{self_name}: {str(folder)!r} gives latent statistics of shapes {tuple(mean.shape)} "
                             f"and {tuple(std.shape)} for {self.latent_channels} latent channels")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)
        if tile_size is not None:
            if tile_size < self.spatial_factor:
                raise ValueError(f"{self_name}: tile_size {tile_size} is smaller than the spatial factor "
                                 f"{self.spatial_factor}")
            family.enable_tiling(vae, tile_size)

    def posterior(self, video: Tensor) -> DiagonalGaussian:
        self.check_video(video)
        dist = self.autoencoder.encode(video).latent_dist  # over [B, c, t, h, w]
        return DiagonalGaussian(dist.mean, dist.logvar)

    def decode_latent(self, z: Tensor) -> Tensor:
        self.check_latent(z)
        return self.autoencoder.decode(z).sample  # [B, 3, T, H, W]

    @torch.no_grad()
    def encode_raw(self, video: Tensor) -> Tensor:
        return self.autoencoder.encode(video.to(self.autoencoder.dtype)).latent_dist.mean.float()  # [B, c, t, h, w]

    @torch.no_grad()
    def decode_raw(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z.to(self.autoencoder.dtype)).sample.float()  # [B, 3, T, H, W]
