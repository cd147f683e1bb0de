"""Variational (KL-regularised) compressors: the diagonal Gaussian posterior and latent normalisation statistics.

A VAE compressor (Kingma & Welling, "Auto-Encoding Variational Bayes", 2014; as used for latent diffusion by
Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", 2022) encodes a video to a diagonal
Gaussian over a raw latent ``z``. Diffusion wants a latent with roughly zero mean and unit variance per channel, so
``encode`` returns ``(z - latent_mean) / latent_std`` and ``decode`` inverts it. The statistics are *buffers*: they
are measured from data once (:meth:`VariationalCompressor.fit_latent_statistics`) and travel in the state dict with
the weights, so a trained compressor file is self-contained.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from framework.core.interfaces import Compressor


@dataclass
class DiagonalGaussian:
    """A diagonal Gaussian over a latent ``[B, c, t, h, w]``, parameterised by mean and log-variance."""

    mean: Tensor  # [B, c, t, h, w]
    logvar: Tensor  # [B, c, t, h, w], clamped to [-30, 20] by ``from_moments``

    @staticmethod
    def from_moments(moments: Tensor) -> DiagonalGaussian:
        """Split ``[B, 2c, ...]`` encoder output into mean and log-variance (clamped, as LDM does, for stability)."""
        mean, logvar = moments.chunk(2, dim=1)  # each [B, c, ...]
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + (0.5 * self.logvar).exp() * noise  # [B, c, t, h, w]

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample ``[B]``, averaged over latent elements (so its weight does not depend on
        the latent size)."""
        per_element = 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar)  # [B, c, t, h, w]
        return per_element.flatten(1).mean(1)  # [B]


def video_batches(batches: Iterable) -> Iterable[list[Tensor]]:
    """Accept a datamodule's batches (dicts with ``"videos"``), tensors ``[B, C, T, H, W]`` or lists of videos."""
    for batch in batches:
        videos = batch["videos"] if isinstance(batch, dict) else batch
        yield list(videos)


class VariationalCompressor(Compressor):
    """A Compressor with a Gaussian posterior, trainable by ``CompressorTraining``; owns latent normalisation.

    Subclasses implement :meth:`posterior` and :meth:`decode_latent` (raw latent, whole clip, differentiable), and
    may override :meth:`encode_raw` / :meth:`decode_raw` for memory-bounded inference (tiling). ``encode`` returns
    the posterior *mean*, normalised, so the same video always gives the same latent (a latent cache is exact).
    """

    def __init__(self, latent_channels: int) -> None:
        super().__init__()
        if latent_channels < 1:
            raise ValueError(f"{type(self).__name__}: latent_channels must be >= 1, got {latent_channels}")
        self.latent_channels = latent_channels
        self.register_buffer("latent_mean", torch.zeros(latent_channels))  # [c]
        self.register_buffer("latent_std", torch.ones(latent_channels))  # [c]

    # ------------------------------------------------------------------------------------- subclass contract
    @abstractmethod
    def posterior(self, video: Tensor) -> DiagonalGaussian:
        """``[B, 3, T, H, W]`` -> Gaussian over the raw latent ``[B, c, t, h, w]`` (whole clip, differentiable)."""

    @abstractmethod
    def decode_latent(self, z: Tensor) -> Tensor:
        """Raw latent ``[B, c, t, h, w]`` -> video ``[B, 3, T, H, W]`` (whole clip, differentiable, unclamped)."""

    def encode_raw(self, video: Tensor) -> Tensor:
        """Inference encode to the raw latent (posterior mean); override to tile."""
        return self.posterior(video).mean

    def decode_raw(self, z: Tensor) -> Tensor:
        """Inference decode from the raw latent; override to tile."""
        return self.decode_latent(z)

    # ------------------------------------------------------------------------------------ Compressor contract
    def check_video(self, video: Tensor) -> None:
        """Raise ValueError naming the dimension of ``video`` that this compressor cannot take."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}.encode expects [B, 3, T, H, W], got {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])

    def check_latent(self, latent: Tensor) -> None:
        if latent.dim() != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__}.decode expects [B, {self.latent_channels}, t, h, w], got {tuple(latent.shape)}"
            )

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)  # [B, c, t, h, w]

    def denormalize(self, latent: Tensor) -> Tensor:
        return latent * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)  # [B, c, ...]

    def encode(self, video: Tensor) -> Tensor:
        self.check_video(video)
        return self.normalize(self.encode_raw(video))  # [B, c, t, h, w]

    def decode(self, latent: Tensor) -> Tensor:
        self.check_latent(latent)
        return self.decode_raw(self.denormalize(latent)).clamp(-1.0, 1.0)  # [B, 3, T, H, W]

    # ------------------------------------------------------------------------------------ latent statistics
    @torch.no_grad()
    def fit_latent_statistics(self, batches: Iterable, max_batches: int | None = None) -> tuple[Tensor, Tensor]:
        """Measure the per-channel mean and standard deviation of the raw latent (posterior means) over
        ``batches`` (a dataloader of ``{"videos": [...]}`` dicts, tensors, or lists of ``[3, T, H, W]``), store
        them in the ``latent_mean`` / ``latent_std`` buffers and return them. Statistics are pooled over every
        latent element, so clips of different sizes weigh by their latent size."""
        total = torch.zeros(self.latent_channels, dtype=torch.float64)
        total_sq = torch.zeros(self.latent_channels, dtype=torch.float64)
        count = 0
        for i, videos in enumerate(video_batches(batches)):
            if max_batches is not None and i >= max_batches:
                break
            for z in self.encode_raw_list(videos):  # each [c, t, h, w]
                flat = z.detach().double().cpu().flatten(1)  # [c, t*h*w]
                total += flat.sum(1)
                total_sq += flat.square().sum(1)
                count += flat.shape[1]
        if count == 0:
            raise ValueError(f"{type(self).__name__}.fit_latent_statistics: the data gave no videos")
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
        self.latent_mean.copy_(mean.float())
        self.latent_std.copy_(std.float())
        return self.latent_mean.clone(), self.latent_std.clone()

    def encode_raw_list(self, videos: list[Tensor]) -> list[Tensor]:
        """Raw latents of variable-size ``[3, T, H, W]`` videos, one clip at a time."""
        device = self.latent_mean.device
        out = []
        for video in videos:
            self.check_video(video[None])
            out.append(self.encode_raw(video[None].to(device))[0])  # [c, t, h, w]
        return out

    # -------------------------------------------------------------------------------------------- weights I/O
    def save_weights(self, path: str | Path) -> Path:
        """Write the weights and latent statistics as one ``.safetensors`` file (the ``checkpoint`` argument)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))
        return path

    def load_weights(self, path: str | Path) -> None:
        """Load a ``.safetensors`` file from :meth:`save_weights` or a Lightning ``.ckpt`` whose state dict holds
        this VAE under a ``compressor.`` prefix (``CompressorTraining``); raises naming the file and the keys."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{type(self).__name__}: checkpoint {str(path)!r} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            full = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            state = {k.removeprefix("compressor."): v for k, v in full.items() if k.startswith("compressor.")}
        own = self.state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(
                f"{type(self).__name__}: checkpoint {str(path)!r} does not match this configuration (latent "
                f"channels, size, factors): missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"wrong shape {sorted(wrong)[:5]}"
            )
        self.load_state_dict(state)
