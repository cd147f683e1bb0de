"""Micro-conditions: per-sample scalars (frame rate, original size) a denoiser is conditioned on.

SDXL (Podell et al., "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", 2023, Sec. 2.2)
conditions the denoiser on each training image's *original* size, before it was resized and cropped, so small or
upscaled images still teach the model without teaching it to make blurry outputs; at inference the requested size
asks for a sharp image. Open-Sora (Zheng et al., 2024) adds the clip's frame rate the same way, so footage at 8 and
30 fps teaches motion at both speeds instead of averaging them. Here each scalar is embedded on its own -- sinusoidal
features, then a two-layer MLP (Open-Sora's ``SizeEmbedder``) -- and the embeddings are added to the timestep +
pooled-caption vector that drives every adaLN modulation.

The MLPs' output layers start at zero, so a model with micro-conditions is at initialisation the same function as
the model without them, and an existing model given them (weights loaded non-strictly) starts unchanged.

Contract: a denoiser lists what it uses in ``Denoiser.micro_conditions``; ``VideoDiffusion`` attaches the values to
the ``Conditioning`` (``Conditioning.micro_conditions``) from the training batch (``"fps"`` and
``"original_sizes"``) or from the prompt at generation, the same values on the guided and unguided branch.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

STILL_IMAGE_FPS = 0.0
"""The frame rate an image (a 1-frame clip) is conditioned on: it has no motion, and so no rate."""


class MicroCondition(str, enum.Enum):
    """A per-sample scalar the denoiser can be conditioned on."""

    FPS = "fps"  # frames per second of the clip (STILL_IMAGE_FPS for images)
    ORIGINAL_HEIGHT = "original_height"  # pixels, before resize and crop
    ORIGINAL_WIDTH = "original_width"  # pixels, before resize and crop


@dataclass(frozen=True)
class MicroConditions:
    """The micro-condition values of a batch, one per sample."""

    fps: Tensor  # [B] frames per second (STILL_IMAGE_FPS for images)
    original_height: Tensor  # [B] pixels before resize and crop
    original_width: Tensor  # [B] pixels before resize and crop

    @staticmethod
    def build(
        fps: Sequence[float], original_sizes: Sequence[tuple[int, int]], device: torch.device | str | None = None
    ) -> MicroConditions:
        """From per-sample frame rates and original (height, width); raises ValueError naming a bad value."""
        if len(fps) != len(original_sizes):
            raise ValueError(f"micro-conditions: got {len(fps)} frame rates and {len(original_sizes)} original sizes")
        rates = [_number(rate, f"sample {i}'s fps", minimum=0.0) for i, rate in enumerate(fps)]
        pairs = []
        for i, size in enumerate(original_sizes):
            if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
                raise ValueError(f"micro-conditions: sample {i}'s original size must be (height, width), got {size!r}")
            pairs.append([_number(s, f"sample {i}'s original {name}", minimum=1.0)
                          for s, name in zip(size, ("height", "width"))])
        sizes = torch.tensor(pairs, device=device).reshape(-1, 2)  # [B, 2]
        return MicroConditions(torch.tensor(rates, device=device), sizes[:, 0], sizes[:, 1])

    @staticmethod
    def from_batch(batch: Mapping, device: torch.device | str | None = None) -> MicroConditions:
        """From a training batch's ``"fps"`` (list of float) and ``"original_sizes"`` (list of (height, width)), as
        every built-in data module collates them; a missing key raises ValueError naming it."""
        for key in ("fps", "original_sizes"):
            if key not in batch:
                raise ValueError(
                    f"the denoiser is conditioned on micro-conditions, but the training batch has no {key!r} "
                    f"(keys: {sorted(batch)}); a data module must collate 'fps' (list of float) and "
                    "'original_sizes' (list of (height, width)) as framework.data.datamodules.collate_videos does"
                )
        return MicroConditions.build(list(batch["fps"]), list(batch["original_sizes"]), device)

    @property
    def batch_size(self) -> int:
        return self.fps.shape[0]

    def value(self, kind: MicroCondition) -> Tensor:
        """The values [B] of one micro-condition."""
        if kind is MicroCondition.FPS:
            return self.fps
        if kind is MicroCondition.ORIGINAL_HEIGHT:
            return self.original_height
        return self.original_width

    def select(self, index: slice | Tensor) -> MicroConditions:
        return MicroConditions(self.fps[index], self.original_height[index], self.original_width[index])

    @staticmethod
    def cat(items: Sequence[MicroConditions]) -> MicroConditions:
        return MicroConditions(*(torch.cat([getattr(m, name) for m in items]) for name in
                                 ("fps", "original_height", "original_width")))


def _number(value: object, what: str, minimum: float) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < minimum:
        raise ValueError(f"micro-conditions: {what} must be a finite number >= {minimum:g}, got {value!r}")
    return number


def generation_fps(frames: int, requested: float | None, default: float) -> float:
    """The frame rate a generated clip is conditioned on: the prompt's, else ``default`` (the model's output rate)
    for a video and STILL_IMAGE_FPS for a single frame, matching how images are conditioned in training."""
    if requested is not None:
        return float(requested)
    return STILL_IMAGE_FPS if frames == 1 else float(default)


def sinusoidal_features(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal features of scalars ``values`` [B] -> [B, dim] (float32).

    Frequencies run from 1 to ``1 / max_period`` radians per unit, so integers up to about ``max_period`` (frame
    rates, pixel sizes) get distinct features without rescaling, as SDXL embeds sizes."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([args.cos(), args.sin()], dim=-1)  # [B, dim]


class MicroConditionEmbedder(nn.Module):
    """Embeds the chosen micro-conditions into one vector per sample: for each, sinusoidal features and an MLP
    (``Linear -> SiLU -> Linear``), summed. The output layers are zero-initialised (``initialize_weights``), so
    the embedding starts at exactly zero."""

    def __init__(self, kinds: Sequence[MicroCondition], width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        kinds = tuple(MicroCondition(k) for k in kinds)
        if not kinds:
            raise ValueError("MicroConditionEmbedder: no micro-conditions given")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"micro_conditions lists one twice: {[k.name for k in kinds]}")
        self.kinds, self.frequency_dim = kinds, frequency_dim
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width)) for _ in kinds
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Small first layer (as DiT's timestep embedder), zero output layer: the embedding starts at zero and grows
        only as far as the micro-conditions help. Denoisers call this after their own initialisation."""
        for mlp in self.mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.zeros_(mlp[0].bias)
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def forward(self, values: MicroConditions | None) -> Tensor:
        """``values`` of B samples -> [B, width]."""
        if values is None:
            raise ValueError(
                f"the denoiser is conditioned on micro-conditions {[k.name for k in self.kinds]}, but the "
                "Conditioning carries none: set Conditioning.micro_conditions (VideoDiffusion does, from the batch's "
                "'fps' and 'original_sizes' or the prompt)"
            )
        embedded = [mlp(sinusoidal_features(values.value(kind), self.frequency_dim))  # [B, W]
                    for kind, mlp in zip(self.kinds, self.mlps)]
        return torch.stack(embedded).sum(0)  # [B, W]
