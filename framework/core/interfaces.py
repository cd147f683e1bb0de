"""The five plugin contracts. ``framework`` knows only these; concrete choices live in ``plugins/``.

Shapes are part of the contract:

* video  ``[B, C, T, H, W]`` in [-1, 1]  (a list of ``[C, T, H, W]`` when sizes differ)
* latent ``[B, c, t, h, w]``              (a list of ``[c, t, h, w]`` when sizes differ)
* tokens ``PackedSequence`` with ``tokens [N, D]``, ``cu_seqlens [B + 1]``, ``positions [N, 3]``
* timestep ``[B]`` in [0, 1], 0 = clean data, 1 = pure noise
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    import PIL.Image

from framework.core.micro_conditions import MicroCondition, MicroConditions
from framework.layers.packing import PackedSequence


# --------------------------------------------------------------------------------------------------- compressor
class Compressor(nn.Module, ABC):
    """Maps videos to a spacetime latent and back.

    A causal compressor maps ``1 + k * temporal_factor`` frames to ``1 + k`` latent frames, so a single image is a
    valid 1-frame video; a non-causal one maps ``k * temporal_factor`` frames to ``k``.
    """

    latent_channels: int
    temporal_factor: int = 1
    spatial_factor: int = 1
    causal: bool = False

    @abstractmethod
    def encode(self, video: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` -> ``[B, c, t, h, w]``."""

    @abstractmethod
    def decode(self, latent: Tensor) -> Tensor:
        """``[B, c, t, h, w]`` -> ``[B, C, T, H, W]``."""

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (t, h, w) for a video size; raises ValueError naming the dimension that does not fit."""
        tf, sf = self.temporal_factor, self.spatial_factor
        for name, size in (("height", height), ("width", width)):
            if size <= 0 or size % sf:
                raise ValueError(f"{type(self).__name__}: {name} {size} must be a positive multiple of {sf}")
        if self.causal:
            if frames < 1 or (frames - 1) % tf:
                raise ValueError(f"{type(self).__name__}: frames {frames} must be 1 + k*{tf} (causal compressor)")
            return 1 + (frames - 1) // tf, height // sf, width // sf
        if frames < 1 or frames % tf:
            raise ValueError(f"{type(self).__name__}: frames {frames} must be a positive multiple of {tf}")
        return frames // tf, height // sf, width // sf

    def encode_list(self, videos: list[Tensor]) -> list[Tensor]:
        """Encode variable-size ``[C, T, H, W]`` videos, batching those of equal shape together."""
        return _apply_grouped(self.encode, videos)

    def decode_list(self, latents: list[Tensor]) -> list[Tensor]:
        return _apply_grouped(self.decode, latents)


def _apply_grouped(fn: Callable[[Tensor], Tensor], items: list[Tensor]) -> list[Tensor]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(items):
        groups.setdefault(tuple(x.shape), []).append(i)
    out: list[Tensor | None] = [None] * len(items)
    for indices in groups.values():
        for i, y in zip(indices, fn(torch.stack([items[i] for i in indices]))):
            out[i] = y
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------- patcher
class Patcher(nn.Module, ABC):
    """Cuts latents into spacetime patches (tokens) and packs variable-size samples into one sequence."""

    patch_size: tuple[int, int, int]  # (pt, ph, pw)

    def token_dim(self, latent_channels: int) -> int:
        return latent_channels * math.prod(self.patch_size)

    def grid_size(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Token grid (t, h, w) for a latent (t, h, w); raises ValueError naming the dimension that does not fit."""
        grid = []
        for name, size, patch in zip(("frames", "height", "width"), latent_shape, self.patch_size):
            if size <= 0 or size % patch:
                raise ValueError(
                    f"{type(self).__name__}: latent {name} {size} is not divisible by the patch size {patch} "
                    f"(patch_size={self.patch_size}, latent shape (t, h, w)={tuple(latent_shape)})"
                )
            grid.append(size // patch)
        return tuple(grid)  # type: ignore[return-value]

    @abstractmethod
    def patchify(self, latents: list[Tensor]) -> PackedSequence:
        """List of ``[c, t, h, w]`` latents -> one PackedSequence."""

    @abstractmethod
    def unpatchify(self, packed: PackedSequence) -> list[Tensor]:
        """Inverse of ``patchify``: exact round trip."""


# ------------------------------------------------------------------------------------------------- conditioner
@dataclass
class Conditioning:
    """What a denoiser is conditioned on, per sample.

    The conditioner builds the caption part; ``micro_conditions`` (frame rate, original size; see
    ``framework/core/micro_conditions.py``) are properties of the clip, not of the caption, so ``VideoDiffusion`` attaches
    them (``with_micro_conditions``) from the training batch or the prompt -- only when the denoiser lists some in
    ``Denoiser.micro_conditions``, and the same values on the guided and unguided branch of classifier-free guidance.
    """

    context: Tensor  # [B, L, context_dim] token features (e.g. text encoder outputs)
    context_mask: Tensor  # [B, L] bool, True for real tokens; every row has at least one
    pooled: Tensor  # [B, pooled_dim] one vector per sample (goes into adaLN with the timestep)
    micro_conditions: MicroConditions | None = None  # per-sample fps and original size, [B] each

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def with_micro_conditions(self, values: MicroConditions) -> Conditioning:
        if values.batch_size != self.batch_size:
            raise ValueError(f"micro-conditions for {values.batch_size} samples given to a Conditioning of "
                             f"{self.batch_size}")
        return replace(self, micro_conditions=values)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch, padding the context length (used to batch guided and unguided passes)."""
        length = max(c.context.shape[1] for c in items)
        pad = lambda x, value: nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, length - x.shape[1]), value=value)
        with_micro = [c.micro_conditions is not None for c in items]
        if any(with_micro) and not all(with_micro):
            raise ValueError("Conditioning.cat: some items carry micro-conditions and some do not")
        return Conditioning(
            torch.cat([pad(c.context, 0.0) for c in items]),
            torch.cat([pad(c.context_mask, False) for c in items]),
            torch.cat([c.pooled for c in items]),
            MicroConditions.cat([c.micro_conditions for c in items]) if all(with_micro) else None,
        )


class Conditioner(nn.Module, ABC):
    """Turns captions into a Conditioning; owns tokenization, the encoder, caption dropout and the null condition.

    Caption dropout (training only) replaces a caption by the empty caption, which is exactly the null condition
    used for classifier-free guidance, so the model learns the unconditional branch it is sampled with.
    """

    context_dim: int
    pooled_dim: int

    @abstractmethod
    def forward(self, captions: list[str]) -> Conditioning: ...

    def null(self, batch_size: int) -> Conditioning:
        """The unconditional branch for classifier-free guidance."""
        was_training = self.training
        self.eval()  # never drop captions (or anything else) while building the null branch
        try:
            return self([""] * batch_size)
        finally:
            self.train(was_training)


# ---------------------------------------------------------------------------------------------------- denoiser
@dataclass(frozen=True)
class DenoiserIO:
    """Sizes a denoiser learns from its neighbours instead of repeating them in every config."""

    token_dim: int  # patcher.token_dim(compressor.latent_channels)
    context_dim: int  # conditioner.context_dim
    pooled_dim: int  # conditioner.pooled_dim


class Denoiser(nn.Module, ABC):
    """Predicts from noisy packed tokens what the sampler asks for (velocity, noise or clean data).

    ``bind`` is called once by the training/inference module with the sizes of the neighbouring plugins; it builds
    the input and output projections, so changing the patch size or text encoder is a one-line config change.

    ``micro_conditions`` lists the per-sample scalars (fps, original height and width) the denoiser reads from
    ``Conditioning.micro_conditions``; when it is non-empty the caller must attach them (VideoDiffusion does).
    """

    micro_conditions: tuple[MicroCondition, ...] = ()

    @abstractmethod
    def bind(self, io: DenoiserIO) -> None: ...

    @abstractmethod
    def forward(self, x: PackedSequence, timestep: Tensor, cond: Conditioning) -> PackedSequence:
        """``x.tokens`` [N, token_dim], ``timestep`` [B] in [0, 1] -> prediction with the same layout."""

    def prepare(self, cond: Conditioning) -> Conditioning:
        """Compute what depends only on the conditioning (e.g. caption keys and values), for ``forward`` to reuse at
        every step of one sampling run with these weights. Default: nothing to precompute."""
        return cond

    def block_stack(self) -> nn.ModuleList:
        """The transformer blocks ``forward`` runs in order, each taking the hidden states first (positionally or
        as ``hidden_states``) and returning them (or a tuple starting with them); step caches
        (``plugins/denoisers/step_cache.py``) skip them. Default: the denoiser exposes none."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its transformer blocks (block_stack), "
                                  "so a step cache cannot wrap it")


# ----------------------------------------------------------------------------------------------------- sampler
ModelFn = Callable[[PackedSequence, Tensor], PackedSequence]
"""A denoiser with its conditioning (and guidance) bound: ``(x_t, t[B]) -> prediction``."""

StepCallback = Callable[[int, Tensor, PackedSequence], None]
"""Called after each sampling step with (step index, t[B], current x)."""


class Sampler(nn.Module, ABC):
    """Owns the diffusion process end to end: training timesteps, noising, target, loss weights and sampling."""

    @abstractmethod
    def training_loss(self, model_fn: ModelFn, clean: PackedSequence, generator: torch.Generator | None = None,
                      loss_mask: Tensor | None = None) -> Tensor:
        """Noise ``clean`` at random timesteps, call the model, return the per-sample loss ``[B]``; ``loss_mask``
        [N] bool limits the loss to those tokens (frame conditioning leaves given frames out)."""

    @abstractmethod
    def sample(
        self, model_fn: ModelFn, noise: PackedSequence, steps: int, callback: StepCallback | None = None
    ) -> PackedSequence:
        """Integrate from pure noise (t = 1) to data (t = 0); returns clean tokens with the layout of ``noise``."""


class Captioner(nn.Module, ABC):
    """Describes clips in words: one caption per clip, each given as a list of RGB frames (PIL images)."""

    @abstractmethod
    def caption(self, clips: list[list["PIL.Image.Image"]]) -> list[str]: ...
